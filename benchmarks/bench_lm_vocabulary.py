"""Benchmark: one measurement of a language model with GPT-2's vocabulary against one training step (issue 8).

Hugging Face GPT-2 configurations with the real vocabulary (50,257 tokens) and random weights, narrow and
shallow (``--width``, ``--layers``) so that the vocabulary-sized work dominates, as it does per token in any
LM head: the tied head of GPT-2 (``auto`` picks the Monte-Carlo Gauss-Newton diagonal) and an untied one
(``auto`` picks the sketched Hessian diagonal). One batch of ``--batch`` sequences of ``--seq`` tokens,
``labels = input_ids``, as Hugging Face's causal-LM docs train it.

Each row runs in a fresh subprocess whose address space is capped at its size after the imports plus
``--memory-gb`` (an allocation past the cap fails in that process instead of the machine's OOM killer
stopping everything): a training step (AdamW: forward with ``labels``, backward, step) or one measurement
(``measure_sharpness`` on the batch, ``num_replicates=1``, every other default). Reported: the outcome, wall
seconds, and the peak resident set size above the process's own before the step (sampled every 2 ms).

Also timed in this process: the class draws of 10 rows (``torch.multinomial`` against the inverse CDF),
and the untied head's token columns (the direct sketches of eq. 20) against the tokens per chunk
(``TOKEN_SKETCH_CHUNK_ELEMENTS``).

Run from the repository root: ``python -m benchmarks.bench_lm_vocabulary --json PATH`` (the library on
``PYTHONPATH`` is the one measured, so a checkout of an earlier commit gives the "before" rows);
``--quick`` is a smoke test.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time

from benchmarks.common import base_parser, interleaved_times, setup, write_json

VOCABULARY = 50257


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def run_one(spec: dict) -> dict:
    """One row, in this process (the subprocess's entry point)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_flatness.measure import measure_sharpness

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    config = GPT2Config(
        vocab_size=spec["vocab"],
        n_positions=spec["seq"],
        n_embd=spec["width"],
        n_layer=spec["layers"],
        n_head=2,
        tie_word_embeddings=spec["tied"],
    )
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]))
    batch = {"input_ids": ids, "labels": ids}
    limit = _address_space() + int(spec["memory_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_mb())

    base = _rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    out: dict = {}
    try:
        if spec["kind"] == "training step":
            model.train()
            optimizer = torch.optim.AdamW(model.parameters())
            model(**batch).loss.backward()
            optimizer.step()
        else:
            model.eval()
            result = measure_sharpness(model, [batch], num_replicates=1)
            out = {"method": result.choice.method, "normalized": float(result["normalized"])}
        out["outcome"] = "ran"
    except (MemoryError, RuntimeError) as err:  # the cap: "can't allocate memory" / DefaultCPUAllocator
        out = {"outcome": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    out["seconds"] = time.perf_counter() - start
    stop.set()
    sampler.join()
    out["peak_mb_above_start"] = max(peak[0], _rss_mb()) - base
    return out


def class_draw_times(quick: bool, rows: int = 10, repeats: int = 20) -> dict:
    """Median milliseconds of one draw per row from ``rows`` softmax rows over GPT-2's vocabulary:
    ``torch.multinomial`` against the library's inverse CDF (``_draw_classes``), timed round-robin
    (:func:`~benchmarks.common.interleaved_times`), this process's threads."""
    import torch

    from lightning_flatness.functional.loss_hessian_factors import _draw_classes

    classes = 512 if quick else VOCABULARY
    p = torch.softmax(torch.randn(rows, classes, dtype=torch.float64), dim=1)
    g = torch.Generator().manual_seed(0)
    times = interleaved_times(
        {
            "multinomial_ms": lambda: torch.multinomial(p, 1, replacement=True, generator=g),
            "inverse_cdf_ms": lambda: _draw_classes(p, 1, g),
        },
        repeats=repeats,
    )
    return {"rows": rows, "classes": classes, **{k: t["median"] * 1e3 for k, t in times.items()}}


def sketch_chunk_times(quick: bool, repeats: int = 5) -> dict:
    """Seconds of the untied head's token columns (``token_loss_columns`` with one sketch, eq. 20's 8 draws:
    the direct sketches) of 8 x 128 random logits (2 x 8 with ``quick``) against the tokens per chunk, set
    through ``TOKEN_SKETCH_CHUNK_ELEMENTS``; round-robin (:func:`~benchmarks.common.interleaved_times`)."""
    import torch

    from lightning_flatness.functional import loss_hessian_factors as factors
    from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
    from lightning_flatness.functional.model_io import TokenLoss

    n, t, v = (2, 8, 512) if quick else (8, 128, VOCABULARY)
    logits, target = torch.randn(n, t, v), torch.randint(0, v, (n, t))
    loss_fn = TokenLoss(normalized_softmax_cross_entropy, shift=True)
    default = factors.TOKEN_SKETCH_CHUNK_ELEMENTS

    def columns(tokens: int):
        def run() -> None:
            factors.TOKEN_SKETCH_CHUNK_ELEMENTS = tokens * v * 2  # one sketch: 2 columns a token
            try:
                factors.token_loss_columns(
                    loss_fn, logits, target, 8, torch.Generator().manual_seed(0), num_sketches=1
                )
            finally:
                factors.TOKEN_SKETCH_CHUNK_ELEMENTS = default

        return run

    chunks = (1, 2, 5, 10, 20)
    times = interleaved_times({tokens: columns(tokens) for tokens in chunks}, repeats=1 if quick else repeats)
    return {
        "logits": [n, t, v],
        "default_tokens_per_chunk": default // (2 * v),
        "seconds_by_tokens_per_chunk": {tokens: times[tokens]["median"] for tokens in chunks},
    }


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--memory-gb", type=float, default=12.0)
    p.add_argument("--child", default=None, help="internal: run one row (a JSON spec), print its result")
    args = p.parse_args(argv)
    setup(args)
    if args.child is not None:  # inside the subprocess
        print(json.dumps(run_one(json.loads(args.child))))
        return {}
    draws = class_draw_times(args.quick)
    print(
        f"class draws, {draws['rows']} rows x {draws['classes']} classes: torch.multinomial "
        f"{draws['multinomial_ms']:.2f} ms, inverse CDF {draws['inverse_cdf_ms']:.2f} ms"
    )
    chunking = sketch_chunk_times(args.quick)
    print(
        "untied head's token columns, tokens per chunk: "
        + ", ".join(f"{k}: {s:.2f} s" for k, s in chunking["seconds_by_tokens_per_chunk"].items())
    )
    if args.quick:
        args.batch, args.seq, args.memory_gb = 2, 8, 4.0
    vocab = 512 if args.quick else VOCABULARY
    rows = []
    for tied in (True,) if args.quick else (True, False):  # quick: the subprocess rows of GPT-2's own head
        for kind in ("training step", "measurement"):
            spec = dict(
                kind=kind, tied=tied, vocab=vocab, width=args.width, layers=args.layers, batch=args.batch,
                seq=args.seq, memory_gb=args.memory_gb, threads=args.threads, seed=args.seed,
            )  # fmt: skip
            done = subprocess.run(
                [
                    sys.executable,
                    "-W",
                    "ignore",
                    "-m",
                    "benchmarks.bench_lm_vocabulary",
                    "--child",
                    json.dumps(spec),
                ],
                capture_output=True,
                text=True,
                env=os.environ.copy(),
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"outcome": f"process ended ({done.returncode})"}
            rows.append({**spec, **result})
            r = rows[-1]
            print(
                f"{'tied' if tied else 'untied'} head, {kind}: {r['outcome']}, "
                f"{r.get('seconds', float('nan')):.1f} s, "
                f"peak +{r.get('peak_mb_above_start', float('nan')):.0f} MB {r.get('method', '')}",
                flush=True,
            )
    results = {
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
        "class_draws": draws,
        "sketch_chunks": chunking,
    }
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
