"""The download stage: candidate pairs in, downloaded images in resumable webdataset shards out.

- ``plan.py``: the pure core: URL records (``key_pair``, ``make_url_record``,
  ``apply_verdict``), the shard plan (``num_shards_for``, ``shard_of``, ``plan.json``), shard
  assembly (``assemble_shard``, ``shard_counters``), shard files. The ``download`` config
  section checks itself (``config.DownloadConfig``).
- ``fetch.py``: the fetch side: img2dataset's ``Downloader`` for one shard, the header probe
  (``header_size``, ``ProbingResizer``), error reasons, the guard and opener options.
- ``transforms.py``: the Beam side: ``ReadCandidates``, ``DownloadImages`` (robots.txt per
  origin, one DoFn per shard, ``stats.json``).
- ``netguard.py``: the SSRF guard: address policy, resolvers, checked connections, deadline
  sockets, error reasons.
- ``guarded_http.py``: HTTP through the guard: the process-wide ``urllib`` opener img2dataset
  uses, the ``requests`` session for robots.txt, per-host limits.
- ``robots.py``: robots.txt fetching and policy.
"""
