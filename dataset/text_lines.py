"""Stage-2 text-only data for VLMo (VLMo.md sections 3.3 and 13.2): plain-text files, one sample per line.

The official stage 2 reads one line of the Wikipedia + BookCorpus files per sample, with no further segmentation,
truncated to 196 tokens by the tokenizer. Here the config's `text_files` list names UTF-8 text files; every line that
is not blank is one sample (a blank line would be an empty text: `[CLS] [SEP]`, nothing to mask), read as written
(no ALBEF cleaning). The files are indexed once by the byte offset of each line (8 bytes a line, so 100 M lines take
0.8 GB) and read lazily, so the text itself never sits in memory. Items are `(placeholder image, line)`: the shared
pretraining collate stacks the 1 x 1 placeholders and tokenises the lines; the stage-2 model never reads the image.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset


def line_offsets(path: str) -> np.ndarray:
    """Byte offsets of the non-blank lines of `path`."""
    offsets, position = [], 0
    with open(path, 'rb') as f:
        for line in f:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return np.asarray(offsets, dtype=np.int64)


class text_line_dataset(Dataset):
    """One sample per non-blank line of `files` -> (placeholder image [3, 1, 1], the line without its newline)."""

    def __init__(self, files):
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise ValueError('text_files is empty: give the stage-2 text files (one sample per line)')
        self.files, offsets = [], []
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f'text_files: {path} does not exist (the stage-2 text, one sample per line)')
            found = line_offsets(path)
            if len(found) == 0:
                raise ValueError(f'text_files: {path} has no non-blank line')
            self.files.append(path)
            offsets.append(found)
        self.file_of = np.concatenate([np.full(len(o), i, dtype=np.int32) for i, o in enumerate(offsets)])
        self.offset = np.concatenate(offsets)
        self._handles = {}  # opened lazily, per process (DataLoader workers each open their own)
        self.placeholder = torch.zeros(3, 1, 1)

    def __len__(self) -> int:
        return len(self.offset)

    def line(self, index: int) -> str:
        file = int(self.file_of[index])
        handle = self._handles.get((os.getpid(), file))
        if handle is None:
            handle = self._handles[(os.getpid(), file)] = open(self.files[file], 'rb')
        handle.seek(int(self.offset[index]))
        return handle.readline().decode('utf-8', errors='replace').rstrip('\r\n')

    def __getitem__(self, index: int):
        return self.placeholder, self.line(index)

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_handles'] = {}  # file handles do not travel to spawned workers
        return state
