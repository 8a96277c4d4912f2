# Worker image for Dataflow (and Flink/Spark with --environment_type=DOCKER), and for Dask workers
# on Kubernetes (run it with the command `dask worker ...`, docs/scaling.md): Beam's Python 3.11
# SDK image with wit-pipeline and its dependencies at the versions pinned in constraints.txt.
# torch 2.14.1 from PyPI is the CUDA 13.0 build, so the same image serves the GPU workers of the
# CLIP-score step (score.accelerator). See docs/scaling.md.
#
#   docker build -t us-central1-docker.pkg.dev/PROJECT/wit/wit-pipeline:0.1.0 .
#   docker push us-central1-docker.pkg.dev/PROJECT/wit/wit-pipeline:0.1.0
#   wit build ... --runner DataflowRunner \
#       --sdk_container_image us-central1-docker.pkg.dev/PROJECT/wit/wit-pipeline:0.1.0
#
# The Beam version here must equal the launcher's (apache-beam==2.77.0, pinned in pyproject).
FROM apache/beam_python3.11_sdk:2.77.0

ENV NO_ALBUMENTATIONS_UPDATE=1 \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/wit-pipeline
COPY constraints.txt pyproject.toml README.md LICENSE ./
COPY wit_pipeline ./wit_pipeline
RUN pip install -c constraints.txt ".[dataflow,dask]" \
    && python -c "import apache_beam, distributed, img2dataset, open_clip, torch, wit_pipeline.build; \
assert apache_beam.__version__ == '2.77.0', apache_beam.__version__; print('torch', torch.__version__)"

# Keep the SDK image's entrypoint (/opt/apache/beam/boot): Dataflow starts the worker harness.
# A Dask worker pod overrides it: command ["dask", "worker", "tcp://SCHEDULER:8786", ...].
