"""``on_step`` callbacks that write :class:`StepRecord` s: to CSV, or to a
TensorBoard ``SummaryWriter``. They read the record only; no gradient is
touched again."""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Optional, Union

from .records import StepRecord

__all__ = ["CsvLogger", "TensorBoardLogger"]


class CsvLogger:
    """``on_step`` callback writing one CSV row of :meth:`StepRecord.as_dict`
    per step to a path (appended) or an open text file."""

    def __init__(self, file: Union[str, "os.PathLike[str]", io.TextIOBase]):
        if isinstance(file, (str, os.PathLike)):
            self._file = open(file, "a", newline="")
            self._owned = True
        else:
            self._file = file
            self._owned = False
        self._writer: Optional[csv.DictWriter] = None

    def __call__(self, record: StepRecord) -> None:
        row = record.as_dict()
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(row))
            if self._file.tell() == 0:
                self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._owned:
            self._file.close()


class TensorBoardLogger:
    """``on_step`` callback logging each record's scalars with
    ``writer.add_scalar`` (a ``torch.utils.tensorboard.SummaryWriter`` or any
    object with that method) under ``prefix/``; with ``per_tensor=True`` also
    every gradient's norm under ``prefix/norm/<parameter name>``."""

    def __init__(self, writer: Any, prefix: str = "gradclip", per_tensor: bool = False):
        self.writer = writer
        self.prefix = prefix
        self.per_tensor = per_tensor

    def __call__(self, record: StepRecord) -> None:
        for key, value in record.as_dict().items():
            if key != "step":
                self.writer.add_scalar(f"{self.prefix}/{key}", float(value), record.step)
        if self.per_tensor:
            for name, norm in record.tensor_norms().items():
                self.writer.add_scalar(f"{self.prefix}/norm/{name}", norm, record.step)
