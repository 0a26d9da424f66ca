"""SharedKVDecoder: the decode loop for lean graphs (one max-length KV buffer per layer, bound once).

A lean graph (tapernorm.compiler.lean; metadata `tapernorm.kv_cache = shared`) runs GroupQueryAttention on
a past/present buffer of the full context length that it updates in place. So the loop binds everything
once per prompt through IOBinding and then, per step, only:

- writes the sampled tokens into a preallocated (B, 1) int64 host buffer (bound once);
- rebinds `attention_mask` as a (B, W) view of one preallocated buffer (a pointer bind: no array is made);
- runs, and copies the (B, V) logits that sampling needs out of the bound (B, 1, V) output buffer.

No OrtValue, numpy array or dict is created per step (the KV buffers stay on the session's device).
Rows are right-padded: row b's mask is 1 for its first L_b columns, GroupQueryAttention writes row b's
next key at L_b and takes the rotary position from it, and the graph's logits are each row's last real
position. Equal-length rows (batch 1 included) need no per-step mask writes at all.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

__all__ = ["SharedKVDecoder"]


class SharedKVDecoder:
    """Stateful decoder over a lean DecoderSession; same shape as OrtDecoder: start() then step()."""

    def __init__(self, session, max_len: int | None = None, io_binding: bool | None = None):
        self.session = session
        self.max_len = max_len or session.config.max_seq_len
        if not self.max_len:
            raise ValueError(f"{session.model_path}: a shared-KV graph needs the context length (max_seq_len in "
                             "runtime.json) to size its cache; re-run `tapernorm compile`")
        ctx = session.config.max_seq_len
        if ctx and self.max_len > ctx:  # the graph's rotary / position tables end at the model's context
            raise ValueError(f"max_len {self.max_len} exceeds {session.model_path.name}'s {ctx}-token context; "
                             f"pass max_len <= {ctx}")
        self.io_binding = True  # the shared buffer only exists through IOBinding
        self._sess = session.session
        self._past_names, self._present_names = session.past_names, session.present_names
        self._batch = None
        self.length = 0
        self.time_runs = False  # benchmarks: accumulate run_with_iobinding seconds of decode steps in run_s
        self.run_s = 0.0

    def _alloc(self, B: int) -> None:
        """KV buffers (B, H, max_len, D) on the device, host mask/token/logits buffers; once per batch size."""
        s, c = self.session, self.session.config
        shape = [B, c.num_kv_heads, self.max_len, c.head_dim]
        if s.device == "cuda":
            self._kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, s.np_dtype, "cuda", s.device_id)
                        for _ in self._past_names]
        else:
            self._kv_host = [np.zeros(shape, dtype=s.np_dtype) for _ in self._past_names]  # kept alive
            self._kv = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._kv_host]
        self._mask_flat = np.ones(B * self.max_len, dtype=np.int64)  # (B, W) views are its first B*W entries
        self._mask_ptr = self._mask_flat.ctypes.data
        self._tok = np.zeros((B, 1), dtype=np.int64)
        self._logits = np.zeros((B, 1, c.vocab_size), dtype=s.np_dtype)
        self._io = io = self._sess.io_binding()
        for p, q, ov in zip(self._past_names, self._present_names, self._kv):
            io.bind_ortvalue_input(p, ov)
            io.bind_ortvalue_output(q, ov)  # present IS past: GroupQueryAttention writes in place
        io.bind_output("logits", "cpu", 0, self._logits.dtype, list(self._logits.shape), self._logits.ctypes.data)
        self._batch = B
        # the per-step calls go to onnxruntime's C bindings directly when this version exposes them (the Python
        # wrappers re-validate and rebuild a device object every call: ~2 us a step); else the public API
        c_io, c_sess = getattr(io, "_iobinding", None), getattr(self._sess, "_sess", None)
        try:
            dev = ort.OrtDevice.make("cpu", 0)._get_c_device()
        except AttributeError:
            dev = None
        if c_io is not None and c_sess is not None and dev is not None:
            self._bind_ptr = lambda name, shape, ptr: c_io.bind_input(name, dev, np.int64, shape, ptr)
            self._run = lambda: c_sess.run_with_iobinding(c_io, None)
        else:
            self._bind_ptr = lambda name, shape, ptr: io.bind_input(name, "cpu", 0, np.int64, shape, ptr)
            self._run = lambda: self._sess.run_with_iobinding(io)

    def _bind_mask(self, W: int) -> None:
        B = self._batch
        if self._ragged:  # right-padded rows: lay out (B, W) row-major at the buffer's start
            np.copyto(self._mask_flat[:B * W].reshape(B, W), self._mask2d[:, :W])
        self._bind_ptr("attention_mask", [B, W], self._mask_ptr)

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Prefill prompts (B, T) (left- or right-padded; mask 1 on real tokens); returns last-token logits (B, V)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        lens = mask.sum(axis=1)
        if lens.min() < 1:
            raise ValueError("every prompt needs at least one token (a row of the attention mask is all 0)")
        if T >= self.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit the model's {self.max_len}-token context; "
                             f"shorten the prompt to at most {self.max_len - 1} tokens")
        if B != self._batch:
            self._alloc(B)
        self._ragged = bool((lens != T).any())
        if self._ragged:  # repack every row's real tokens to the left (right padding)
            packed = np.zeros_like(ids)
            self._mask2d = np.zeros((B, self.max_len), dtype=np.int64)
            for b in range(B):
                row = ids[b][mask[b] != 0]
                packed[b, :row.size] = row
                self._mask2d[b, :row.size] = 1
            ids, self._lens = packed, lens.astype(np.int64)
        else:
            self._mask_flat.fill(1)
        self._io.bind_cpu_input("input_ids", ids)
        self._bind_mask(T)
        self._run()
        self._io.bind_cpu_input("input_ids", self._tok)  # decode steps: the (B, 1) buffer, bound once
        self.length = T
        return self._logits[:, 0].copy()

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row (B,); returns logits (B, V)."""
        if self.length >= self.max_len:
            raise ValueError(f"the {self.max_len}-token context is full; stop generating")
        self._tok[:, 0] = tokens
        self.length += 1
        if self._ragged:
            self._mask2d[np.arange(self._batch), self._lens] = 1
            self._lens += 1
        self._bind_mask(self.length)
        if self.time_runs:
            t0 = time.perf_counter()
            self._run()
            self.run_s += time.perf_counter() - t0
        else:
            self._run()
        return self._logits[:, 0].copy()
