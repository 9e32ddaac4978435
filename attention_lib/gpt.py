"""A small GPT built from the course's modules, and how it writes (chapter 16).

The model is GPT-2's architecture (Radford et al. 2019): token and learned position
embeddings, pre-norm blocks of :class:`attention_lib.MultiHeadAttention` (chapter 6)
and an MLP with the tanh approximation of GELU, a final layer norm and a read-out
tied to the token embedding. Decoding can reuse each layer's keys and values through
:class:`attention_lib.KVCache` (chapter 11).

Sampling turns the logits of the last position into the next token:

* ``temperature`` divides the logits (``0`` means greedy: always the most likely token);
* :func:`top_k_filter` keeps the ``k`` most likely tokens;
* :func:`top_p_filter` keeps the smallest set of most likely tokens whose probability
  mass reaches ``p`` (nucleus sampling, Holtzman et al. 2020).

:func:`load_gpt2_state_dict` copies the weights of Hugging Face's ``GPT2LMHeadModel``
into a :class:`GPT`; :func:`load_text` returns the novel the chapter trains on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .attention import scaled_dot_product_attention
from .kv_cache import KVCache
from .multi_head import MultiHeadAttention

__all__ = [
    "GPTConfig",
    "GPT",
    "CharTokenizer",
    "generate",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
    "load_gpt2_state_dict",
    "load_text",
]

TEXTS = {"persuasion": "persuasion.txt"}  # name -> file in attention_lib/data (see its README)


def load_text(name: str = "persuasion") -> str:
    """A public-domain text shipped with the package: ``"persuasion"`` is Jane Austen's
    *Persuasion* (1818), 466 770 ASCII characters (source: ``attention_lib/data/README.md``)."""
    if name not in TEXTS:
        raise ValueError(f"name must be one of {sorted(TEXTS)}, got {name!r}")
    return resources.files("attention_lib").joinpath("data").joinpath(TEXTS[name]).read_text(encoding="utf-8")


class CharTokenizer:
    """Characters as tokens: the vocabulary is the sorted set of characters of ``text``."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        """A string -> its token ids, (len(s),) int64."""
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def decode(self, ids) -> str:
        """Token ids (a 1-D tensor or a list) -> the string."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"token ids must be ints in 0 .. {len(self.chars) - 1}; got {bad[:5]!r}")
        return "".join(self.chars[i] for i in ids)


@dataclass
class GPTConfig:
    """The shape of a :class:`GPT`.

    Args:
        vocab_size: V.
        block_size: the longest context, the number of learned positions.
        n_layer, n_head, n_embd: depth, heads H, width E (a multiple of H).
        n_kv_head: key/value heads (default H; fewer gives grouped-query attention).
        dropout: on embeddings, attention weights and residual branches while training.
        bias: biases in the linear layers and layer norms.
        tie_weights: the read-out shares the token embedding's weight (GPT-2 does).
        layer_norm_eps: GPT-2 uses 1e-5.
        mlp_ratio: the MLP's hidden width is ``mlp_ratio * n_embd``.
        gelu_approximate: ``"tanh"`` (GPT-2's ``gelu_new``) or ``"none"`` (exact erf).
    """

    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    layer_norm_eps: float = 1e-5
    mlp_ratio: int = 4
    gelu_approximate: str = "tanh"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_kv_head is not None and (
            isinstance(self.n_kv_head, bool)
            or not isinstance(self.n_kv_head, int)
            or self.n_kv_head < 1
            or self.n_head % self.n_kv_head
        ):
            raise ValueError(f"n_kv_head must be a positive int dividing n_head ({self.n_head}), got {self.n_kv_head!r}")

    @classmethod
    def from_hf_config(cls, hf_config) -> GPTConfig:
        """The config of a Hugging Face ``GPT2Config`` (``model.config``)."""
        act = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
        if hf_config.activation_function not in act:
            raise ValueError(f"activation_function {hf_config.activation_function!r} is not supported; "
                             f"expected one of {sorted(act)}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(hf_config, flag, False):
                raise ValueError(f"GPT2Config.{flag}=True is not supported")
        if not getattr(hf_config, "scale_attn_weights", True):
            raise ValueError("GPT2Config.scale_attn_weights=False is not supported")
        n_inner = hf_config.n_inner or 4 * hf_config.n_embd
        if n_inner % hf_config.n_embd:
            raise ValueError(f"n_inner ({n_inner}) must be a multiple of n_embd ({hf_config.n_embd})")
        return cls(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.n_positions,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            dropout=hf_config.resid_pdrop,
            tie_weights=getattr(hf_config, "tie_word_embeddings", True),
            layer_norm_eps=hf_config.layer_norm_epsilon,
            mlp_ratio=n_inner // hf_config.n_embd,
            gelu_approximate=act[hf_config.activation_function],
        )


class MLP(nn.Module):
    """Linear E -> r·E, GELU, linear back to E (GPT-2's names ``c_fc``, ``c_proj``)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, E) -> (B, T, E)
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """A pre-norm block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (chapter 7)."""

    def __init__(self, config: GPTConfig, attn_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = MultiHeadAttention(config.n_embd, config.n_head, config.n_kv_head, bias=config.bias,
                                       dropout=config.dropout, attn_fn=attn_fn)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), is_causal=True, kv_cache=kv_cache))  # (B, T, E)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer: ``tokens (B, T) -> logits (B, T, V)``.

    Args:
        config: the :class:`GPTConfig`.
        attn_fn: the attention function of every layer, SDPA-compatible (default
            :func:`attention_lib.scaled_dot_product_attention`; PyTorch's
            ``torch.nn.functional.scaled_dot_product_attention`` works too).

    Module names follow GPT-2's (``wte``, ``wpe``, ``h``, ``ln_f``, ``lm_head``) so that
    :func:`load_gpt2_state_dict` reads like a table.
    """

    def __init__(self, config: GPTConfig, attn_fn: Callable[..., torch.Tensor] = scaled_dot_product_attention):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, attn_fn) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 · layers)
            if name.endswith("c_proj.weight") or name.endswith("out_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Parameters, counting a tied read-out once."""
        return sum(p.numel() for p in self.parameters())

    def new_caches(self, batch_size: int, **kwargs) -> list[KVCache]:
        """One empty :class:`KVCache` per layer, in the model's dtype and device
        (``kwargs`` go to ``KVCache``, e.g. ``quantize="int8"``)."""
        w = self.wte.weight
        attns = [cast(MultiHeadAttention, blk.attn) for blk in self.h]
        return [KVCache(batch_size, a.num_kv_heads, a.head_dim, dtype=w.dtype, device=w.device, **kwargs) for a in attns]

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits for every position of ``idx``.

        Args:
            idx: (B, T) int64 token ids. With ``caches``, these are the *new* tokens:
                their positions continue after the ``len(caches[0])`` cached ones.
            caches: one :class:`KVCache` per layer (from :meth:`new_caches`), or None.

        Returns:
            (B, T, V) logits.
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) int64 tensor, got {_describe(idx)}")
        if caches is not None and len(caches) != len(self.h):
            raise ValueError(f"caches must hold one KVCache per layer ({len(self.h)}), got {len(caches)}")
        start = 0 if caches is None else len(caches[0])
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"{start} cached + {T} new positions exceed block_size={self.config.block_size}")
        V = self.config.vocab_size
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
            raise ValueError(f"token ids must lie in 0 .. {V - 1} (vocab_size={V}); got {int(idx.min())} .. {int(idx.max())}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, E)
        for i, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__


# ----------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor (..., V), got {_describe(logits)}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row and set the others to ``-inf``.

    Args:
        logits: (..., V).
        k: a positive int; ``k >= V`` keeps every token.

    Returns:
        (..., V), exactly ``min(k, V)`` finite entries per row where the input is finite.
    """
    _check_logits(logits)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"top_k must be a positive int, got {k!r}")
    if k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability
    mass is at least ``p``, and set the other logits to ``-inf`` (Holtzman et al. 2020).

    Sorted by probability, token ``i`` is kept if the mass of the tokens before it is
    still below ``p``; the most likely token is always kept.

    Args:
        logits: (..., V).
        p: in (0, 1]; 1 keeps every token.

    Returns:
        (..., V).
    """
    _check_logits(logits)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    if p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (..., V): mass of the more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0.0 \
            or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token for each row of ``logits`` (B, V): (B, 1) int64.

    ``temperature == 0`` is greedy decoding (``argmax``; ``top_k`` and ``top_p`` do not
    change it). Otherwise the logits are divided by ``temperature``, filtered by
    :func:`top_k_filter` then :func:`top_p_filter`, and one token is drawn from their
    softmax with ``generator``.
    """
    _check_logits(logits)
    _check_sampling(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend the prompt ``idx`` (B, T) by ``max_new_tokens`` tokens: (B, T + max_new_tokens).

    Each step samples from the logits of the last position with :func:`sample_next`.
    The model conditions on at most ``block_size`` tokens, the last ones.

    * ``use_cache=False`` reruns the whole context at every step.
    * ``use_cache=True`` feeds the prompt once (the prefill) into one
      :class:`KVCache` per layer, then only the newest token. Positions are learned and
      absolute, so once the context is longer than ``block_size`` the window slides and
      every position changes: the caches are then refilled from the last
      ``block_size`` tokens at each step, which gives the same tokens as without a cache.

    The model runs in eval mode (no dropout) and is put back in its mode afterwards.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"model must be an attention_lib.gpt.GPT, got {type(model).__name__}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long or idx.shape[1] < 1:
        raise ValueError(f"idx must be a (B, T >= 1) int64 tensor, got {_describe(idx)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    block = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        caches = model.new_caches(idx.shape[0]) if use_cache else []
        new = idx[:, -block:]  # the tokens the caches have not seen yet
        for _ in range(max_new_tokens):
            if not caches:
                logits = model(idx[:, -block:])
            else:
                if len(caches[0]) + new.shape[1] > block:  # the window slides: refill
                    for cache in caches:
                        cache.reset()
                    new = idx[:, -block:]
                logits = model(new, caches)
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            idx, new = torch.cat([idx, nxt], dim=1), nxt
    finally:
        model.train(was_training)
    return idx


# ----------------------------------------------------------------------------------
# GPT-2 weights from Hugging Face
# ----------------------------------------------------------------------------------

_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers versions


def load_gpt2_state_dict(model: GPT, hf_state_dict: Mapping[str, torch.Tensor]) -> GPT:
    """Copy the weights of a Hugging Face GPT-2 into ``model`` (in place) and return it.

    ``hf_state_dict`` is ``GPT2LMHeadModel.state_dict()`` (names ``transformer.h.0...``)
    or a raw GPT-2 checkpoint (names ``h.0...``). The mapping, per layer ``i``:

    =============================  ==========================================
    Hugging Face                   attention_lib
    =============================  ==========================================
    ``wte``, ``wpe``, ``ln_f``     the same names
    ``h.i.ln_1``, ``h.i.ln_2``     the same names
    ``h.i.attn.c_attn`` (E, 3E)    ``h.i.attn.{q,k,v}_proj``: split in three, transposed
    ``h.i.attn.c_proj`` (E, E)     ``h.i.attn.out_proj``, transposed
    ``h.i.mlp.c_fc`` (E, 4E)       ``h.i.mlp.c_fc``, transposed
    ``h.i.mlp.c_proj`` (4E, E)     ``h.i.mlp.c_proj``, transposed
    ``lm_head``                    tied to ``wte`` (or copied if not tied)
    =============================  ==========================================

    GPT-2's ``Conv1D`` stores its weight as (in, out) and computes ``x @ W + b``;
    ``nn.Linear`` stores (out, in) and computes ``x @ W.T + b``: hence the transposes.
    Raises ``ValueError`` naming missing, unexpected or mis-shaped entries.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"model must be an attention_lib.gpt.GPT, got {type(model).__name__}")
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items() if not k.endswith(_BUFFERS)}
    E, cfg = model.config.n_embd, model.config
    if cfg.n_kv_head not in (None, cfg.n_head):
        raise ValueError("GPT-2 has as many key/value heads as query heads: use n_kv_head=None")
    ours = {}  # our name -> tensor in our layout
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        ours[name] = sd.pop(name, None)
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            for t in ("weight", "bias"):
                ours[p + f"{ln}.{t}"] = sd.pop(p + f"{ln}.{t}", None)
        w, b = sd.pop(p + "attn.c_attn.weight", None), sd.pop(p + "attn.c_attn.bias", None)
        if w is not None and tuple(w.shape) != (E, 3 * E):
            raise ValueError(f"{p}attn.c_attn.weight must be (E, 3E) = ({E}, {3 * E}), got {tuple(w.shape)}")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            ours[p + f"attn.{proj}.weight"] = None if w is None else w[:, j * E:(j + 1) * E].t()
            ours[p + f"attn.{proj}.bias"] = None if b is None else b[j * E:(j + 1) * E]
        conv = {"attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
        for theirs, mine in conv.items():
            w = sd.pop(p + theirs + ".weight", None)
            ours[p + mine + ".weight"] = None if w is None else w.t()
            ours[p + mine + ".bias"] = sd.pop(p + theirs + ".bias", None)
    head = sd.pop("lm_head.weight", None)
    if not cfg.tie_weights:
        ours["lm_head.weight"] = head
    missing = sorted(k for k, v in ours.items() if v is None)
    if missing or sd:
        raise ValueError(f"state dict does not match the model: missing {missing}, unexpected {sorted(sd)}")
    found = {k: v for k, v in ours.items() if v is not None}
    target = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs ours {tuple(target[k].shape)}" for k, v in found.items()
             if tuple(v.shape) != tuple(target[k].shape)]
    if wrong:
        raise ValueError("shapes do not match: " + "; ".join(wrong))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in found.items():
            params[k].copy_(v)
    return model
