"""What a run of `lungrt infer` is asked to do (its options and exit codes), shared by every front door."""

from __future__ import annotations

import errno
from dataclasses import dataclass

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = 0, 2, 3


# a full, over-quota, read-only or failing disk stops the run (every later write would fail too)
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


@dataclass
class InferOptions:
    batch_size: int = 8
    workers: int = 2
    overlay: bool = False
    probabilities: bool = False
    resume: bool = False
    strict: bool = False
    postprocess: bool = True
    screen: str = "flag"  # DICOM header says not a frontal chest film: "flag" (QC reasons) or "skip" (no mask)
    dicom_seg: bool = False  # also a DICOM Segmentation per DICOM input (NAME.seg.dcm)
    mask_bits: int = 1  # NAME.mask.png as a 1-bit PNG (same pixels as the 8-bit one, a fifth of the time) or 8-bit
    pool: str = "thread"  # helpers for decoding and writing: "thread" or "process" (past the GIL, `helper_pools`)
    complete_shape: bool = False  # add the lung the shape model says is missing where QC finds the shape implausible
    pad_batch: bool = False  # always run batch_size (a service: its batches never depend on how many films came)


HELPER_POOLS = ("thread", "process")
