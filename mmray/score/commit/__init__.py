"""Exactly-once output commit for batch scoring: hidden staging, deterministic names, markers last.

A run writes everything into a hidden staging directory of its own (``_``-prefixed: Arrow, Spark, Ray
and DuckDB readers skip it), then publishes it to the target (``<output>[/k=v...]``):

* ``part-00000.parquet`` ... : the scored rows, under final, deterministic names.
* ``_quarantine/part-00000.parquet``: rows that failed preprocessing or prediction.
* ``_metrics.json`` (``--evaluate`` only), then ``_manifest.json`` (files, row counts, model_id, input
  files with sizes and content fingerprints, config hash), then ``_SUCCESS`` (counts) last.

After a commit the committed data files are exactly the non-hidden Parquet files in the target.

Local disk: the staging directory is a sibling of the target and is complete (markers included) before
it is renamed into place in one step; an existing target is swapped with ``renameat2(RENAME_EXCHANGE)``,
so readers see the old or the new partition, never a mix and never nothing. A killed run leaves only
hidden staging behind.

S3 (no rename): staging lives under ``<target>/_staging-<run>/``. Publishing deletes ``_SUCCESS``, copies
the files server-side to their final names, deletes names a previous commit had and this one has not,
and writes the markers. The copy phase is short; readers gated on ``_SUCCESS`` (``committed_files``
here) never see partial output, and a rerun rewrites the same names, so no duplicate survives.

Only one run at a time works on a target: it holds the target's lease (``mmray.score.lease``: ``flock``
on ``_lease-<name>`` beside a local target, a conditional-create ``<target>/_lease`` object on S3) from
before it decides anything until after it published, and re-checks the committed run under it just
before publishing. Readers need no lease: ``read_committed`` reads the files of one ``_SUCCESS``
generation and retries when a publish replaced it meanwhile.

A target is replaced only when it is absent, empty, or an mmray commit (it holds ``_SUCCESS``,
``_manifest.json`` or ``_quarantine``): hidden entries such as ``.ssh/`` are a user's data too.

Each staging directory holds an owner record (host, pid, process start time), written atomically and
removed only after the rename that publishes it. A later run removes staging whose owner is gone (an
unreadable record counts as gone), but never that of a run still in progress. Where the filesystem has
no atomic exchange (``renameat2``; e.g. NFS), an overwrite takes two renames via ``_old-<run>-<name>``;
a run killed between them leaves the target missing, and the next run restores it from there.

The modules, each one step of it: ``target`` (the output location, its partition and the hidden names
beside it; the target's lease), ``identity`` (what makes two runs the same), ``markers`` (reading and
writing ``_SUCCESS`` / ``_manifest.json``: what is committed, and whether a target may be replaced),
``staging`` (a run's staging directory, owner records, cleanup of killed runs), ``publishing`` (the
local rename and the S3 copy phase) and ``atomic`` (the local filesystem's fsync, atomic file writes and
``renameat2`` exchange).
"""

from mmray.score.commit.identity import fingerprint_inputs, identity_differences, run_identity
from mmray.score.commit.markers import (
    check_nesting,
    check_replaceable,
    committed_files,
    committed_run,
    read_committed,
    write_rejected_quarantine,
)
from mmray.score.commit.publishing import publish
from mmray.score.commit.staging import Staging, carry_committed, clean_stale_staging, open_staging
from mmray.score.commit.target import (
    MANIFEST,
    METRICS,
    QUARANTINE,
    QUARANTINE_FILE,
    SUCCESS,
    ConcurrentCommitError,
    OutputExistsError,
    Target,
    check_apart,
    check_location,
    lease,
    validate_partition,
)
from mmray.score.lease import Lease, LeaseHeldError, LeaseLostError

__all__ = [
    "MANIFEST",
    "METRICS",
    "QUARANTINE",
    "QUARANTINE_FILE",
    "SUCCESS",
    "ConcurrentCommitError",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "OutputExistsError",
    "Staging",
    "Target",
    "carry_committed",
    "check_apart",
    "check_location",
    "check_nesting",
    "check_replaceable",
    "clean_stale_staging",
    "committed_files",
    "committed_run",
    "fingerprint_inputs",
    "identity_differences",
    "lease",
    "open_staging",
    "publish",
    "read_committed",
    "run_identity",
    "validate_partition",
    "write_rejected_quarantine",
]
