"""The built-in demo model: a small MoE (Qwen3-MoE, or DeepSeek-V3-style: ``pipeline/demo/architecture.py``)
trained on the demo corpus, on a CPU, in minutes.

Like production checkpoints it is trained with a *weak per-layer* load-balancing loss: every
expert of every layer is trained, yet the load stays clearly uneven. transformers' own aux loss
pools the logits of all layers before balancing (it balances layers against each other, not
each layer), so the Switch loss here is computed per layer and averaged (a DeepSeek-V3 router's
``e_score_correction_bias`` stays 0: the choice bias is what the pipeline calibrates). The ``collapsed``
variant trains with no balancing loss at all (dead experts): the stress case.

The model is saved with ``save_pretrained`` into a cache directory keyed by its config and the
Python version (the corpus is the standard library), next to ``demo_report.json`` with its
held-out perplexity and per-layer load figures, and loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import DemoConfig
from pipeline.data.corpus import Document, PackedSequence, iter_packed, split_documents
from pipeline.demo.architecture import build_model, per_layer_balance_loss, routing
from pipeline.demo.corpus import demo_documents
from pipeline.evaluation.metrics import expert_load, load_summary
from pipeline.moe.families import FAMILIES
from pipeline.progress import info, progress_bar

DEMO_HELDOUT_FRACTION = 0.1  # same split function as the pipeline's default corpus split
REPORT_NAME = "demo_report.json"


def cache_root(cfg: DemoConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("LPR_DISTILL_CACHE", Path.home() / ".cache" / "lpr-distill")).expanduser()


def demo_model_dir(cfg: DemoConfig, seed: int) -> Path:
    """Cache directory of the demo model built from ``cfg`` and ``seed`` on this Python."""
    # the default family stays out of the key: models cached before the family setting existed are still found
    exclude = {"cache_dir"} | ({"family"} if cfg.family == "qwen3_moe" else set())
    key = cfg.model_dump(mode="json", exclude=exclude) | {"seed": seed, "python": platform.python_version()}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    family = "" if cfg.family == "qwen3_moe" else f"{cfg.family}-"
    return cache_root(cfg) / f"demo-{family}{cfg.variant}-{digest}"


def train_tokenizer(docs: list[Document], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``docs``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def balance_weight(cfg: DemoConfig, step: int) -> float:
    """Weight of the balance loss at ``step``: linear from balance_coef_start to balance_coef by mid-training."""
    if cfg.variant == "collapsed":
        return 0.0
    progress = min(1.0, step / max(1, cfg.train_steps // 2))
    return cfg.balance_coef_start + (cfg.balance_coef - cfg.balance_coef_start) * progress


def _stack(seqs: list[PackedSequence], seq_len: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.ids for s in seqs if len(s.ids) == seq_len]))


def _eval_batches(docs: list[tuple[int, Document]], tokenizer, cfg: DemoConfig) -> torch.Tensor:
    """One sequence per held-out document (its first ``seq_len`` tokens): many documents, not a few long ones."""
    seqs = []
    for index, doc in docs:
        first = next(iter_packed([(index, doc)], tokenizer=tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.seq_len))
        if len(first.ids) == cfg.seq_len:
            seqs.append(first)
        if len(seqs) == cfg.eval_sequences:
            break
    return _stack(seqs, cfg.seq_len)


@torch.no_grad()
def evaluate(model, batches: torch.Tensor, batch_size: int = 16) -> dict[str, Any]:
    """Held-out cross-entropy and per-layer top-k load of ``batches`` (S, L) int64."""
    model.eval()
    losses, loads = [], None
    for start in range(0, len(batches), batch_size):
        ids = batches[start : start + batch_size]
        with routing(model) as routed:
            out = model(input_ids=ids, labels=ids, use_cache=False)
        losses.append(float(out.loss) * len(ids))
        step = [expert_load(chosen.numpy(), logits.shape[-1]) for logits, chosen in routed]
        loads = step if loads is None else [a + b for a, b in zip(loads, step, strict=True)]
    ce = sum(losses) / len(batches)
    per_layer = [load_summary(load) | {"load": load.tolist()} for load in loads]
    return {
        "cross_entropy": ce,
        "perplexity": float(np.exp(ce)),
        "mean_gini": float(np.mean([p["gini"] for p in per_layer])),
        "min_fair_share": float(min(p["min_fair_share"] for p in per_layer)),
        "layers": per_layer,
    }


def train_demo_model(cfg: DemoConfig, *, seed: int, out_dir: Path) -> dict[str, Any]:
    """Build corpus, tokenizer and model; train; evaluate; save into ``out_dir``. Returns the report."""
    started = time.time()
    torch.manual_seed(seed)
    docs = demo_documents(max_chars=cfg.corpus_chars)
    train_docs = list(split_documents(enumerate(docs), split="train", heldout_fraction=DEMO_HELDOUT_FRACTION))
    held_docs = list(split_documents(enumerate(docs), split="heldout", heldout_fraction=DEMO_HELDOUT_FRACTION))
    info(f"demo corpus: {len(docs)} documents ({len(train_docs)} train, {len(held_docs)} held out); training tokenizer")
    tokenizer = train_tokenizer([d for _, d in train_docs], cfg.vocab_size)
    train = _stack(
        list(iter_packed(train_docs, tokenizer=tokenizer, seq_len=cfg.seq_len, max_tokens=None)), cfg.seq_len
    )
    held = _eval_batches(held_docs, tokenizer, cfg)
    info(f"demo tokens: {train.numel():,} train, {held.numel():,} held out over {len(held)} documents")

    model = build_model(cfg, tokenizer)
    convention = FAMILIES[cfg.family].convention
    info("evaluating the untrained model (the perplexity baseline)")
    untrained = evaluate(model, held)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.train_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.train_steps))) * 0.9 + 0.1,
    )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    model.train()
    cursor = 0
    with progress_bar("training demo model", cfg.train_steps) as bar:
        for step in range(cfg.train_steps):
            if cursor + cfg.batch_size > len(order):
                order, cursor = rng.permutation(len(train)), 0
            ids = train[order[cursor : cursor + cfg.batch_size]]
            cursor += cfg.batch_size
            with routing(model) as routed:
                out = model(input_ids=ids, labels=ids, use_cache=False)
            balance = per_layer_balance_loss(routed, convention)
            loss = out.loss + balance_weight(cfg, step) * balance
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.advance(1, note=f"loss {out.loss.detach().item():.3f} balance {balance.detach().item():.3f}")
    trained = evaluate(model, held)
    report = {
        "family": cfg.family,
        "variant": cfg.variant,
        "seed": seed,
        "balance_coef": [balance_weight(cfg, 0), balance_weight(cfg, cfg.train_steps - 1)],
        "train_tokens_seen": cfg.train_steps * cfg.batch_size * cfg.seq_len,
        "heldout_documents": len(held),
        "heldout_tokens": int(held.numel()),
        "untrained": {k: untrained[k] for k in ("cross_entropy", "perplexity", "mean_gini")},
        "trained": trained,
        "perplexity_ratio": trained["perplexity"] / untrained["perplexity"],
        "build_seconds": time.time() - started,
    }
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def ensure_demo_model(cfg: DemoConfig, *, seed: int) -> Path:
    """Path of the cached demo model, building it first if needed (atomically: temp dir + rename)."""
    final = demo_model_dir(cfg, seed)
    if (final / REPORT_NAME).is_file():
        return final
    info(f"building the demo model ({cfg.family}, {cfg.variant}) into {final} — a few minutes on a CPU, once")
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        report = train_demo_model(cfg, seed=seed, out_dir=tmp)
        if (final / REPORT_NAME).is_file():  # another process finished first
            shutil.rmtree(tmp)
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t = report["trained"]
    ginis = ", ".join(f"{layer['gini']:.2f}" for layer in t["layers"])
    info(
        f"demo model: held-out perplexity {t['perplexity']:.1f} (untrained {report['untrained']['perplexity']:.0f}), "
        f"per-layer Gini {ginis} (mean {t['mean_gini']:.2f}), "
        f"least-loaded expert {t['min_fair_share']:.1%} of a fair share, built in {report['build_seconds']:.0f} s"
    )
    return final
