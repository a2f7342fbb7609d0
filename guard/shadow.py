"""Score tokens generated elsewhere (e.g. by an upstream vLLM server) with a truncated model.

The probe reads the residual stream after layer ``L``, so only layers ``0..L`` have to run:
:class:`ShadowScorer` keeps a copy of the model cut after the probed layer (no later
layers, no final norm, no LM head) and scores each request's tokens incrementally with its
own KV cache (:class:`ShadowSession`). A rollback is a cache crop.

:meth:`ShadowScorer.feed_batch` feeds several sessions in **one** forward pass: their
caches are stacked right-aligned (left padding, masked out) for that pass only, and each
session keeps its own cache afterwards, so sessions join, leave and roll back
independently. Sessions may feed different numbers of tokens (shorter feeds are padded
on the right: causal attention keeps the padding out of every real token's state).
Scores equal one-session feeds up to float rounding.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache, DynamicLayer

from guard.arch import arch_spec, decoder_blocks
from guard.capture import HiddenStateCapture
from guard.errors import ModelNotFoundError, ProbeMismatchError
from guard.hooks import hook_name, parse_hook_name
from guard.probe import LinearProbe


def _truncated_config(config: PretrainedConfig, keep: int) -> PretrainedConfig:
    """A copy of ``config`` with only the first ``keep`` decoder layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:keep]
    return config


_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def _load_truncated(
    path: str | Path, config: PretrainedConfig, keep: int, dtype: torch.dtype
) -> PreTrainedModel:
    """Load the first ``keep`` layers of the checkpoint at ``path``.

    The checkpoint's later layers are expected to go unused, so transformers' load report
    (a table of "unexpected" keys on every start) is silenced, and the loading info is
    checked here instead: any missing or mismatched key, or an unused key that is not of
    a later layer, is an error.

    Raises:
        ModelNotFoundError: the checkpoint does not fit the truncated model.
    """
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, output_loading_info=True
        )
    finally:
        report.setLevel(level)
    stray = [
        key
        for key in info.get("unexpected_keys", ())
        if not ((m := _LAYER_KEY.search(key)) and int(m.group(1)) >= keep)
    ]
    problems = {
        "missing": sorted(info.get("missing_keys", ())),
        "mismatched": sorted(map(str, info.get("mismatched_keys", ()))),
        "unexpected": sorted(stray),
    }
    if any(problems.values()):
        raise ModelNotFoundError(
            f"{path} does not load into a {keep}-layer shadow model: "
            + "; ".join(f"{kind} {keys[:5]}" for kind, keys in problems.items() if keys)
        )
    return model


def _probe_layer(probe: LinearProbe, n_layers: int) -> int:
    return parse_hook_name(probe.hook_name).resolve(n_layers).layer


class ShadowScorer:
    """A model truncated after the probe's layer plus the probe.

    Args:
        model: a causal LM whose layers after the probed one are already removed
            (see :meth:`from_pretrained` / :meth:`from_model`).
        probe: fitted probe.
        layer: the probed layer, resolved against the *full* model's depth.
    """

    def __init__(self, model: PreTrainedModel, probe: LinearProbe, *, layer: int) -> None:
        self.model = model.eval()
        self.probe = probe
        self.hook_name = hook_name(parse_hook_name(probe.hook_name).kind, layer)
        self.device = next(model.parameters()).device
        self._base = model.get_submodule(arch_spec(model).blocks.rsplit(".", 1)[0])
        self._n_layers = layer + 1
        self._workspace = _Workspace()
        self._lock = threading.Lock()  # one pass at a time: passes share the workspace

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        probe: LinearProbe,
        *,
        n_layers: int,
        dtype: torch.dtype = torch.float32,
    ) -> ShadowScorer:
        """Load only layers ``0..L`` of the checkpoint at ``path`` (``n_layers`` = full depth).

        Weights of later layers are never materialised, so a 7B model's shadow costs only
        the probed fraction of its memory.
        """
        layer = _probe_layer(probe, n_layers)
        keep = layer + 1
        config = _truncated_config(AutoConfig.from_pretrained(path), keep)
        if config.hidden_size != probe.n_features_in_:
            raise ProbeMismatchError(
                f"probe expects d_model={probe.n_features_in_}, {path} has {config.hidden_size}"
            )
        return cls(_load_truncated(path, config, keep, dtype), probe, layer=layer)

    @classmethod
    def from_model(cls, model: PreTrainedModel, probe: LinearProbe) -> ShadowScorer:
        """Share a loaded model's first ``L + 1`` blocks (no copy of the weights)."""
        probe.check_compatible(model, strict_weights=False)
        layer = _probe_layer(probe, len(decoder_blocks(model)))
        keep = layer + 1
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(_truncated_config(model.config, keep))
        spec = arch_spec(model)
        base_path = spec.blocks.rsplit(".", 1)[0]
        base, shell_base = model.get_submodule(base_path), shell.get_submodule(base_path)
        shell_base.embed_tokens = base.embed_tokens
        shell_base.layers = nn.ModuleList(list(base.layers)[:keep])
        shell_base.rotary_emb = base.rotary_emb
        shell.lm_head = nn.Identity()
        shell_base.norm = nn.Identity()
        return cls(shell, probe, layer=layer)

    def session(self) -> ShadowSession:
        """A fresh per-request scoring session."""
        return ShadowSession(self)

    @torch.inference_mode()
    def feed_batch(
        self, sessions: Sequence[ShadowSession], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """Feed ``token_ids[i]`` to ``sessions[i]``, all in one forward pass.

        Args:
            sessions: distinct sessions of this scorer.
            token_ids: the new tokens of each session (counts may differ; the pass costs
                as many positions per row as the longest feed).

        Returns:
            P(unsafe) of each new token's state at the probed layer, per session.

        Raises:
            ValueError: not one token list per session, or a session twice.
        """
        if len(sessions) != len(token_ids):
            raise ValueError("feed_batch needs one token list per session")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("feed_batch got the same session twice")
        fed = [i for i, tokens in enumerate(token_ids) if tokens]
        out: list[list[float]] = [[] for _ in sessions]
        if not fed:
            return out
        with self._lock:
            scores = self._forward([sessions[i]._kv for i in fed], [token_ids[i] for i in fed])
        for i, row_scores in zip(fed, scores):
            out[i] = row_scores
        return out

    def _forward(
        self, rows: list[_RowCache], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """One forward pass of each row's new tokens; the rows keep their new positions."""
        counts = [len(tokens) for tokens in token_ids]
        n = max(counts)
        lengths = [row.length for row in rows]
        slots = max(lengths)
        padded = [list(tokens) + [tokens[-1]] * (n - len(tokens)) for tokens in token_ids]
        ids = torch.tensor(padded, device=self.device)  # [batch, n], ragged rows right-padded
        positions = torch.tensor(lengths, device=self.device).unsqueeze(1) + torch.arange(
            n, device=self.device
        )  # [batch, n]
        mask = torch.ones(len(rows), slots + n, dtype=torch.long, device=self.device)
        for i, length in enumerate(lengths):
            mask[i, : slots - length] = 0  # left padding
        layers = [
            _PassLayer(rows, layer, slots, counts, self._workspace)
            for layer in range(self._n_layers)
        ]
        with HiddenStateCapture(self.model, self.hook_name) as capture:
            # The base model only: no LM head, and nothing runs past the probed layer.
            self._base(
                ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=Cache(layers=layers),
                use_cache=True,
            )
        states = capture.cache[self.hook_name]  # [batch, n, d_model]
        scores = self.probe.score_tensor(states.reshape(-1, states.shape[-1]))
        for layer in layers:
            layer.keep_new_tokens()
        for row, count in zip(rows, counts):
            row.length += count
        return [row[:count] for row, count in zip(scores.reshape(len(rows), n).tolist(), counts)]


class _RowCache:
    """One sequence's keys and values per layer, ``[1, kv_heads, capacity, head_dim]``
    buffers grown by doubling; the first :attr:`length` positions are valid."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid keys and values of ``layer``, ``[1, kv_heads, length, head_dim]``."""
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def reserve(self, layer: int, like: torch.Tensor, n: int) -> None:
        """Make room for ``n`` more positions in ``layer`` (shaped like ``like``)."""
        need = self.length + n
        if layer < len(self.keys) and self.keys[layer].shape[2] >= need:
            return
        capacity = max(2 * need, 64)
        shape = (1, like.shape[1], capacity, like.shape[3])
        keys = like.new_zeros(shape)
        values = like.new_zeros(shape)
        if layer < len(self.keys):
            keys[:, :, : self.length] = self.keys[layer][:, :, : self.length]
            values[:, :, : self.length] = self.values[layer][:, :, : self.length]
            self.keys[layer], self.values[layer] = keys, values
        else:
            self.keys.append(keys)
            self.values.append(values)


class _Workspace:
    """Per-layer key and value buffers that batched passes stack their rows into.

    Reused from pass to pass (grown, never shrunk): fresh multi-megabyte tensors would
    page-fault on every pass, which costs more than the attention itself on a CPU.
    """

    def __init__(self) -> None:
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take(
        self, layer: int, shape: tuple[int, ...], like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous ``shape`` views (uninitialised) of ``layer``'s key and value buffers."""
        size = int(torch.Size(shape).numel())
        while len(self._buffers) <= layer:
            self._buffers.append((like.new_empty(0), like.new_empty(0)))
        keys, values = self._buffers[layer]
        if keys.numel() < size or keys.dtype != like.dtype:
            keys, values = like.new_empty(size * 3 // 2), like.new_empty(size * 3 // 2)
            self._buffers[layer] = (keys, values)
        return keys[:size].view(shape), values[:size].view(shape)


class _PassLayer(DynamicLayer):
    """One decoder layer's cache during one :meth:`ShadowScorer.feed_batch` pass.

    Before the pass it holds the rows' pasts, stacked right-aligned into
    ``[batch, kv_heads, slots, head_dim]`` in the scorer's reused workspace (a single row:
    a view of its own buffer, no copy);
    the layer's forward appends the ``n`` new positions (the longest feed), of which
    :meth:`keep_new_tokens` hands each row's own count back to its cache.
    """

    def __init__(
        self,
        rows: list[_RowCache],
        layer: int,
        slots: int,
        counts: list[int],
        workspace: _Workspace,
    ) -> None:
        super().__init__()
        self._rows, self._layer, self._slots, self._counts = rows, layer, slots, counts
        self._n = n = max(counts)
        self._in_place = len(rows) == 1 and slots > 0
        if slots == 0:  # every row is new: nothing to attend to yet
            return
        if self._in_place:
            row = rows[0]
            row.reserve(layer, row.keys[layer], n)
            self._buffers = (row.keys[layer], row.values[layer])
        else:
            like = next(row for row in rows if row.length).keys[layer]
            shape = (len(rows), like.shape[1], slots + n, like.shape[3])
            keys, values = workspace.take(layer, shape, like)
            for i, row in enumerate(rows):
                pad = slots - row.length
                keys[i, :, :pad] = 0  # masked out, but must be finite
                values[i, :, :pad] = 0
                if row.length:
                    k, v = row.past(layer)
                    keys[i, :, pad:slots] = k[0]
                    values[i, :, pad:slots] = v[0]
            self._buffers = (keys, values)
        self.dtype, self.device = self._buffers[0].dtype, self._buffers[0].device
        self.keys = self._buffers[0][:, :, :slots]  # get_seq_length() == slots
        self.values = self._buffers[1][:, :, :slots]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the pass's new positions ``[batch, kv_heads, n, head_dim]``."""
        if self._slots == 0:
            self.keys, self.values = key_states, value_states
        else:
            end = self._slots + self._n
            keys, values = self._buffers
            keys[:, :, self._slots : end] = key_states
            values[:, :, self._slots : end] = value_states
            self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        self.is_initialized = True
        return self.keys, self.values

    def keep_new_tokens(self) -> None:
        """Copy each row's new positions into its own cache (done in place for one row)."""
        if self._in_place:
            return
        new_keys, new_values = self.keys[:, :, -self._n :], self.values[:, :, -self._n :]
        for i, (row, count) in enumerate(zip(self._rows, self._counts)):
            row.reserve(self._layer, new_keys, count)
            end = row.length + count
            row.keys[self._layer][:, :, row.length : end] = new_keys[i : i + 1, :, :count]
            row.values[self._layer][:, :, row.length : end] = new_values[i : i + 1, :, :count]


class ShadowSession:
    """Incremental scoring of one token sequence (prompt first, then generated tokens)."""

    def __init__(self, scorer: ShadowScorer) -> None:
        self.scorer = scorer
        self._kv = _RowCache()

    @property
    def length(self) -> int:
        """Tokens fed so far."""
        return self._kv.length

    def feed(self, token_ids: list[int]) -> list[float]:
        """Feed tokens; return P(unsafe) of each one's state at the probed layer."""
        return self.scorer.feed_batch([self], [token_ids])[0]

    def rewind(self, n_tokens: int) -> None:
        """Forget the last ``n_tokens`` tokens (rollback).

        Raises:
            ValueError: more tokens than were fed.
        """
        if not 0 <= n_tokens <= self._kv.length:
            raise ValueError(f"cannot rewind {n_tokens} of {self._kv.length} tokens")
        self._kv.length -= n_tokens
