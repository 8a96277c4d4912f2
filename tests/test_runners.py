"""Where `wit build` runs: local-path refusal on remote runners, and Dataflow translation offline.

Every step's pipeline (gather, prebalance, download, finalize with CLIP scoring) is translated to
a Dataflow job graph with ``--dry_run`` (every DoFn pickled, the package's sdist built from
``pyproject.toml`` for staging) without any network: the test network jail fails the test on any
attempt. Local runs with worker processes and Beam's portable runner are tested end to end in
``test_demo.py``.
"""

from __future__ import annotations

import base64
import bz2
import json
import pathlib
import zlib
from unittest import mock

import pyarrow as pa
import pytest

from wit_pipeline import beam_utils, build, cli, config, pipeline, queries, runners
from wit_pipeline.errors import WitError

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU = "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
BUCKET = "gs://bucket/wit"
DATAFLOW = [
    "--runner=DataflowRunner",
    "--project=my-project",
    "--region=us-central1",
    "--temp_location=gs://bucket/tmp",
    "--no_auth",
    "--dry_run=True",
]


# ---------------------------------------------------------------------------------------------
# Which runners read local files; what they refuse


def test_runner_names_and_filesystems():
    assert runners.runner_of([]) == "FnApiRunner"
    assert runners.runner_of(["--runner", "DirectRunner"]) == "DirectRunner"
    assert runners.runner_of(["--runner=DirectRunner"], "DataflowRunner") == "DataflowRunner"
    assert (
        runners.runner_of(["--runner=apache_beam.runners.dataflow.DataflowRunner"])
        == "DataflowRunner"
    )
    share = runners.workers_share_filesystem
    assert share("FnApiRunner", []) and share("DirectRunner", [])
    assert share("PortableRunner", ["--environment_type=LOOPBACK", "--job_endpoint=embed"])
    assert share("FlinkRunner", ["--environment_type", "loopback"])
    assert not share("FlinkRunner", ["--flink_master=host:8081"])
    assert not share("SparkRunner", ["--environment_type=DOCKER"])
    assert not share("DataflowRunner", ["--environment_type=LOOPBACK"])


def test_local_paths_are_refused_on_remote_runners_only():
    paths = [("--input", "gs://b/crawl/*.warc.gz"), ("--queries", "/home/me/q.txt"), ("x", "")]
    runners.check_worker_paths("FnApiRunner", [], paths)  # local workers read local files
    with pytest.raises(WitError) as e:
        runners.check_worker_paths("DataflowRunner", [], paths)
    assert str(e.value) == (
        "--queries /home/me/q.txt is a local path, which DataflowRunner workers cannot read: "
        "copy it to a bucket they can (gs://, s3://, hdfs://) and pass that URL "
        "(docs/scaling.md)"
    )
    with pytest.raises(WitError, match="file:///tmp/a"):
        runners.check_worker_paths("SparkRunner", [], [("--output", "file:///tmp/a")])
    runners.check_worker_paths(
        "DataflowRunner", [], [("--output", "s3://b/o"), ("x", "hdfs://n/p")]
    )


def test_dataflow_needs_the_package_on_its_workers():
    runners.check_worker_package("FnApiRunner", [])
    runners.check_worker_package("FlinkRunner", [])
    runners.check_worker_package("DataflowRunner", ["--setup_file", "./pyproject.toml"])
    runners.check_worker_package("DataflowRunner", ["--sdk_container_image=gcr.io/p/wit:1"])
    with pytest.raises(WitError, match=r"--setup_file ./pyproject.toml .* --sdk_container_image"):
        runners.check_worker_package("DataflowRunner", ["--project=p"])


def test_dask_runner_names_and_where_its_workers_read():
    from wit_pipeline import dask_runner

    full = "apache_beam.runners.dask.dask_runner.DaskRunner"
    assert runners.resolve_runner("dask") == runners.resolve_runner(full) == dask_runner.RUNNER
    assert runners.DASK_RUNNER == dask_runner.RUNNER
    assert runners.resolve_runner("FnApiRunner") == "FnApiRunner"
    assert runners.runner_of(["--runner=dask"]) == runners.runner_of([], full) == "DaskRunner"
    options = beam_utils.pipeline_options(["--runner", "dask", "--dask_client_address=tcp://h:1"])
    assert beam_utils.runner_name(options) == runners.DASK_RUNNER
    share = runners.workers_share_filesystem
    assert share("DaskRunner", [])  # Beam starts a local cluster
    assert share("DaskRunner", ["--dask_client_address=tcp://127.0.0.1:8786"])
    assert share("DaskRunner", ["--dask_client_address", "localhost:8786"])
    assert share("DaskRunner", ["--dask_client_address=tcp://[::1]:8786"])
    assert not share("DaskRunner", ["--dask_client_address=tcp://10.1.2.3:8786"])
    assert not share("DaskRunner", ["--dask_client_address=tls://scheduler.cluster:8786"])


def test_dask_scheduler_file_names_the_address(tmp_path):
    f = tmp_path / "scheduler.json"
    f.write_text(json.dumps({"type": "Scheduler", "address": "tcp://10.0.0.7:8786"}))
    assert runners.dask_address([f"--dask_scheduler_file={f}"]) == "tcp://10.0.0.7:8786"
    assert not runners.workers_share_filesystem("DaskRunner", ["--dask_scheduler_file", str(f)])
    with pytest.raises(WitError, match="no scheduler address in it"):
        runners.dask_address([f"--dask_scheduler_file={tmp_path / 'none.json'}"])


def test_dask_flags_need_the_dask_runner_and_one_scheduler(capsys):
    with runners.dask_cluster(None, ["--x=1"]) as args:
        assert args == ["--x=1"]  # other runners: unchanged
    with runners.dask_cluster("dask", [], address="tcp://10.0.0.7:8786") as args:
        assert args == ["--dask_client_address=tcp://10.0.0.7:8786"]
    with runners.dask_cluster("dask", ["--dask_scheduler_file=s.json"]) as args:
        assert args == ["--dask_scheduler_file=s.json"]  # Beam's own option names it
    refusals = [
        ((None, []), {"workers": 2}, "--dask-workers needs --runner dask"),
        (("FnApiRunner", []), {"address": "tcp://h:1"}, "--dask-address needs --runner dask"),
        (("dask", []), {"workers": 0}, "--dask-workers must be >= 1"),
        (
            ("dask", ["--dask_client_address=tcp://a:1"]),
            {"address": "tcp://b:1"},
            "--dask-address and --dask_client_address: give one scheduler",
        ),
        (("dask", []), {"address": "tcp://b:1", "workers": 2}, "not with a scheduler address"),
    ]
    for args, kwargs, message in refusals:
        with pytest.raises(WitError, match=message), runners.dask_cluster(*args, **kwargs):
            pass
    rc = cli.main(["download", "--input", "c", "--output", "o", "--dask-workers", "2"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "wit: error: --dask-workers needs --runner dask"


def test_an_unreachable_dask_scheduler_is_one_line():
    import apache_beam as beam

    args = ["--runner=dask", "--dask_client_address=tcp://127.0.0.1:9"]
    p = beam.Pipeline(options=beam_utils.pipeline_options([*args, "--dask_connection_timeout=1"]))
    _ = p | beam.Create([1])
    with pytest.raises(WitError, match=r"^cannot reach the Dask scheduler at tcp://127.0.0.1:9: "):
        p.run()


def test_paths_a_remote_dask_worker_does_not_see_are_named(tmp_path):
    """What ``check_dask_worker_paths`` concludes from the workers' answers."""
    queries = tmp_path / "q.txt"
    queries.write_text("dog\n")
    mine = runners._probe([str(queries)], [])["files"]
    probes = [
        runners.PathProbe("--queries", str(queries), files=(str(queries),)),
        runners.PathProbe("--output", str(tmp_path), probe=str(tmp_path / ".p"), token="t"),
    ]
    same = {"files": mine, "probes": ["t"]}
    other_disk = {"files": [None], "probes": [None]}  # neither the file nor the probe
    stale_copy = {"files": [[mine[0][0], mine[0][1] + 1]], "probes": ["t"]}
    answers = {"tcp://a:1": same, "tcp://b:1": other_disk, "tcp://c:1": stale_copy}
    assert [(p.what, w) for p, w in runners.unseen_paths(probes, answers)] == [
        ("--queries", "tcp://b:1"),
        ("--output", "tcp://b:1"),
        ("--queries", "tcp://c:1"),
    ]
    assert runners.unseen_paths(probes, {"tcp://a:1": same}) == []


def test_the_workers_of_a_dask_cluster_are_asked_about_local_paths(monkeypatch, tmp_path):
    """Any scheduler address, loopback too (a port-forwarded scheduler has remote workers):
    the paths go to the workers' check (replaced here, no network: its arguments recorded).
    Without an address Beam starts a local cluster: nothing to ask."""
    seen = []
    monkeypatch.setattr(runners, "check_dask_worker_paths", lambda *a: seen.append(a))
    paths = [("--input", "gs://b/c.warc.gz"), ("--output", str(tmp_path))]
    for address in ("tcp://10.0.0.7:8786", "tcp://127.0.0.1:8786"):
        runners.check_worker_paths("DaskRunner", [f"--dask_client_address={address}"], paths)
    assert seen == [("tcp://10.0.0.7:8786", paths), ("tcp://127.0.0.1:8786", paths)]
    runners.check_worker_paths("DaskRunner", [], paths)
    assert len(seen) == 2


def test_worker_paths_of_a_build():
    cfg = config.apply_overrides(
        config.BuildConfig(),
        {
            "dedup.eval_sets": ["cifar=gs://b/cifar.parquet?split=test", "/data/flickr"],
            "score.pretrained": "laion2b_s34b_b79k",  # an open_clip tag, not a path
        },
    )
    got = build.worker_paths(["gs://b/c.warc.gz"], "gs://b/out", cfg, None)
    assert got == [
        ("--input", "gs://b/c.warc.gz"),
        ("--output", "gs://b/out"),
        ("the shipped query list (no --queries)", queries.default_queries_path()),
        ("eval set", "gs://b/cifar.parquet"),
        ("eval set", "/data/flickr"),
        ("gather.captions.fasttext_model", ""),
        ("download.ca_bundle", ""),
    ]
    seeded = config.override(cfg, "score.pretrained", "runs/raw/latest.pt")
    assert ("score.pretrained (--seed-model)", "runs/raw/latest.pt") in build.worker_paths(
        [], "o", seeded, "q.txt"
    )


def _wit_build(capsys, *args: str) -> tuple[int, str]:
    rc = cli.main(["build", *args])
    return rc, capsys.readouterr().err.strip()


def test_wit_build_on_dataflow_refuses_local_paths_before_touching_anything(capsys, tmp_path):
    remote = [
        "--runner",
        "DataflowRunner",
        "--project=p",
        "--region=us-central1",
        "--temp_location=gs://b/tmp",
    ]
    # Nothing is listed, read or created: the bucket paths below would need the network.
    rc, err = _wit_build(
        capsys, "--input", "gs://b/crawl/*.warc.gz", "--output", "gs://b/out", *remote
    )
    assert rc == 2
    assert err == (
        "wit: error: DataflowRunner workers need wit-pipeline installed: pass --setup_file "
        "./pyproject.toml (stages this package; workers install it with its dependencies) or "
        "--sdk_container_image IMAGE built from the Dockerfile (docs/scaling.md)"
    )
    rc, err = _wit_build(
        capsys,
        "--input",
        "gs://b/crawl/*.warc.gz",
        "--output",
        "gs://b/out",
        "--setup_file=./pyproject.toml",
        *remote,
    )
    assert rc == 2 and err.startswith(
        "wit: error: the shipped query list (no --queries) "
        f"{queries.default_queries_path()} is a local path, which DataflowRunner workers cannot read"
    )
    local_out = tmp_path / "out"
    rc, err = _wit_build(
        capsys,
        "--input",
        "gs://b/crawl/*.warc.gz",
        "--queries",
        "gs://b/q.txt.gz",
        "--output",
        str(local_out),
        "--setup_file=./pyproject.toml",
        *remote,
    )
    assert rc == 2 and err.startswith(f"wit: error: --output {local_out} is a local path")
    assert "\n" not in err and not local_out.exists()


# ---------------------------------------------------------------------------------------------
# Every step translates to a Dataflow job graph, offline


def _translate(add_step, *extra_args: str):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    p = beam.Pipeline(options=PipelineOptions([*DATAFLOW, *extra_args]))
    add_step(p)
    result = p.run()  # translates and pickles every DoFn; submits nothing (--dry_run)
    return result.job


def _names(job) -> set[str]:
    return {t.unique_name for t in job.proto_pipeline.components.transforms.values()}


def _payload_text(job) -> str:
    """Every pickled DoFn/CombineFn of the job, unpickled to bytes, as one searchable string."""
    from apache_beam.portability.api import beam_runner_api_pb2

    chunks = []
    for t in job.proto_pipeline.components.transforms.values():
        if not t.spec.payload:
            continue
        chunks.append(t.spec.payload)
        if t.spec.urn == "beam:transform:pardo:v1":
            pardo = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
            chunks.append(pardo.do_fn.payload)
    out = []
    for c in chunks:
        raw = bytes(c)
        try:  # Beam's pickler: base64 of a bz2 (or, in older versions, zlib) compressed pickle
            data = base64.b64decode(raw, validate=True)
            raw = bz2.decompress(data) if data[:3] == b"BZh" else zlib.decompress(data)
        except Exception:
            pass
        out.append(raw)
    return b"\n".join(out).decode("latin-1")


def _hinted(job, hint: str) -> list[str]:
    comps = job.proto_pipeline.components
    return sorted(
        t.unique_name
        for t in comps.transforms.values()
        if t.environment_id
        and comps.environments[t.environment_id].resource_hints.get("beam:resources:accelerator:v1")
        == hint.encode()
    )


def _cfg() -> config.BuildConfig:
    return config.apply_overrides(
        config.BuildConfig(),
        {
            "score.pretrained": f"{BUCKET}/seed/latest.pt",
            "score.model": "wit-nano",
            "score.keep_fraction": 0.3,
            "score.accelerator": GPU,
        },
    )


def test_gather_prebalance_and_download_translate_for_dataflow():
    cfg = _cfg()
    files = [f"{BUCKET}/crawl/part-{i}.warc.gz" for i in range(3)] + [f"{BUCKET}/laion.parquet"]
    out = f"{BUCKET}/build"
    job = _translate(
        lambda p: pipeline.gather(
            p,
            paths=files,
            output=f"{out}/gather",
            config=cfg.gather,
            queries=f"{BUCKET}/queries.txt.gz",  # a large list: workers load it in setup()
            num_buckets=8,
            queries_sha256="0" * 64,
            extra={"config": config.to_dict(cfg.gather)},
        )
    )
    names = _names(job)
    assert {"Inputs/Impulse", "Write/WriteCandidates"} <= names
    assert any(n.startswith("Gather/") for n in names)
    text = _payload_text(job)
    assert f"{BUCKET}/queries.txt.gz" in text and f"{out}/gather" in text
    assert queries.default_queries_path() not in text

    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string())])
    schema = schema.append(pa.field("query_ids", pa.list_(pa.int32())))
    job = _translate(
        lambda p: pipeline.prebalance(
            p,
            gather_dir=f"{out}/gather",
            output_dir=f"{out}/prebalance",
            config=cfg.balance,
            schema=schema,
            queries_path=f"{BUCKET}/queries.txt.gz",
        )
    )
    assert {"Read/Read", "PreBalance/Count", "WriteCandidates/Write/WriteImpl/WriteBundles"} & (
        _names(job)
    )
    assert any(n.startswith("PreBalance/") for n in _names(job))

    job = _translate(
        lambda p: pipeline.download(
            p,
            files=[f"{out}/prebalance/candidates/part-0000{i}.parquet" for i in range(2)],
            output_dir=f"{out}/download",
            config=cfg.download,
        )
    )
    names = _names(job)
    assert {
        "DownloadImages/FetchRobots",
        "DownloadImages/GroupByShard",
        "DownloadImages/DownloadShards",
    } <= names
    assert _hinted(job, GPU) == []  # no GPU outside the scoring step


def test_finalize_with_scoring_translates_with_package_and_gpu_hint(tmp_path):
    from apache_beam.runners.dataflow.internal import apiclient

    cfg = _cfg()
    out = f"{BUCKET}/build"
    setup_file = str(ROOT / "pyproject.toml")
    job = _translate(
        lambda p: pipeline.finalize(
            p,
            output_dir=out,
            config=cfg,
            work_dir=f"{out}/finalize",
            score=True,
            tars=[f"{out}/download/shards/{i:05d}.tar" for i in range(4)],
            query_columns={"before": {0: 3}, "after_prebalance": {0: 2}},
            queries_path=f"{BUCKET}/queries.txt.gz",
        ),
        f"--setup_file={setup_file}",
        "--machine_type=n2-standard-4",
        "--max_num_workers=8",
    )
    hinted = _hinted(job, GPU)
    assert "Score/ClipScore/Score/RunInference" in hinted
    assert "Score/ClipScore/AttachImages" in hinted
    assert all(n.startswith("Score/ClipScore") for n in hinted)
    # The package travels as an sdist built from pyproject.toml; it holds the package data the
    # workers need (model configs, templates, the demo config).
    deps = [
        d for env in job.proto_pipeline.components.environments.values() for d in env.dependencies
    ]
    from apache_beam.portability.api import beam_runner_api_pb2

    staged = {}
    for d in deps:
        role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload)
        path = beam_runner_api_pb2.ArtifactFilePayload.FromString(d.type_payload).path
        staged[role.staged_name] = path
    assert "workflow.tar.gz" in staged
    import tarfile

    with tarfile.open(staged["workflow.tar.gz"]) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {
        "pyproject.toml",
        "wit_pipeline/build.py",
        "wit_pipeline/model_configs/wit-nano.json",
        "wit_pipeline/demo/demo.yaml",
    } <= members
    # No worker reads a local data path: the job names only bucket paths.
    text = _payload_text(job)
    assert f"{BUCKET}/seed/latest.pt" in text and f"{out}/shards" in text
    assert str(tmp_path) not in text and queries.default_queries_path() not in text
    # The job description Dataflow would receive (file staging patched out, as Beam's tests do).
    options = job.options
    client = apiclient.DataflowApplicationClient(options, job.root_staging_location)
    with (
        mock.patch.object(client, "_stage_resources", return_value=["workflow.tar.gz"]),
        mock.patch.object(client, "stage_file_with_retry"),
    ):
        client.create_job_description(job)
    desc = json.loads(job.json())
    env = desc["environment"]
    assert desc["type"] == "JOB_TYPE_BATCH"
    assert env["workerPools"][0]["machineType"] == "n2-standard-4"
    assert env["workerPools"][0]["autoscalingSettings"]["maxNumWorkers"] == 8
    assert env["sdkPipelineOptions"]["options"]["setup_file"] == setup_file
    assert env["tempStoragePrefix"].startswith("storage.googleapis.com/bucket/tmp/")
