"""E2E NLG BLEU: keras-lora LoRA, full fine-tuning and TRL + PEFT, same settings.

    PYTHONPATH=. python benchmarks/e2e_bleu.py ../shared/e2e/devset.csv --out DIR

keras-lora's own small pretrained GPT-2 (`keras_lora/recipes/assets`) is
exported to a Hugging Face GPT-2 directory with a `tokenizer.json` built
from its vocab.json and merges.txt, so keras-lora's `sft` recipe,
transformers and TRL read the same weights and the same tokenizer. The data
(a CSV with `mr` and `ref` columns) becomes prompt-completion strings: the
prompt is the MR and a newline, the completion the reference (the EOS is
appended to it, as TRL does). The MRs are split into train and held-out
(all references of one MR on the same side); `--test CSV` evaluates on
that file's MRs instead and trains on all of DATA.

Runs, each in its own process, from the same weights, on the same batches
in the same order (`keras_lora.recipes.sft.batches.make_batches`, seeded),
the same number of steps, AdamW with Keras's defaults (weight decay 0.004,
epsilon 1e-7, no clipping), constant learning rate, dropout 0:

- `lora`: `keras_lora.recipes.sft.train` (the family's default targets,
  query and value);
- `full`: the same loop (data, batches, loss, optimizer) with every weight
  trainable (`--full-freeze LAYER ...` keeps those backbone layers at the
  base's weights, e.g. `token_embedding position_embedding`);
- `trl`: TRL's `SFTTrainer` with a PEFT `LoraConfig` (the fused query|key|
  value module, same rank and alpha: the same number of trainable
  parameters) on torch, fed the same examples in the same order.

Then one torch process decodes every held-out MR greedily with each model
(transformers `generate`, stopping at the EOS, at most `--max-new-tokens`
new tokens and never past the model's 128 positions) and scores corpus BLEU
(sacrebleu, every reference of the MR) and ROUGE-L. `OUT/e2e_bleu.json`
holds the table (`runs.NAME.bleu`), `OUT/table.md` the same as Markdown
with ten generations side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):  # e2e_runs beside this file; keras_lora of this checkout
    if _path not in sys.path:
        sys.path.insert(0, _path)

import e2e_runs  # noqa: E402

RUNS = ("lora", "full", "trl")
RESULTS = "e2e_bleu.json"


def read_rows(path: str) -> list[tuple[str, str]]:
    """(mr, ref) pairs of an E2E CSV, whitespace runs collapsed to one space.

    Args:
        path: a CSV file with `mr` and `ref` columns.

    Raises:
        ValueError: when a column is missing or a row is empty.
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"mr", "ref"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path} lacks the column(s) {', '.join(sorted(missing))}: an E2E "
                "CSV has a header with mr and ref"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            mr, ref = " ".join(row["mr"].split()), " ".join(row["ref"].split())
            if not mr or not ref:
                raise ValueError(f"{path}, line {line}: empty mr or ref")
            rows.append((mr, ref))
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def group_by_mr(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{mr: its references}, MRs in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return groups


def split_by_mr(
    rows: list[tuple[str, str]], held_out: int, seed: int
) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """Hold out `held_out` MRs (seeded) with all their references.

    Args:
        rows: (mr, ref) pairs.
        held_out: how many MRs to hold out, fewer than there are.
        seed: seeds the choice.

    Returns:
        (training rows in file order, {held-out mr: references}).

    Raises:
        ValueError: when no MR would be left on one side.
    """
    import numpy as np

    groups = group_by_mr(rows)
    if not 0 < held_out < len(groups):
        raise ValueError(
            f"cannot hold out {held_out} of {len(groups)} MRs: keep at least one "
            "on each side"
        )
    mrs = list(groups)
    order = np.random.default_rng(seed).permutation(len(mrs))
    chosen = {mrs[i] for i in order[:held_out]}
    train = [(mr, ref) for mr, ref in rows if mr not in chosen]
    return train, {mr: refs for mr, refs in groups.items() if mr in chosen}


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU, each hypothesis against all its references.

    Args:
        hypotheses: one string per segment.
        references: the references of each segment (any number each).
    """
    import sacrebleu

    width = max(len(refs) for refs in references)
    streams = [
        [refs[i] if i < len(refs) else None for refs in references]
        for i in range(width)
    ]
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, start=1):
            previous, row[j] = (
                row[j],
                previous + 1 if x == y else max(row[j], row[j - 1]),
            )
    return row[-1]


def rouge_l(
    hypotheses: list[str], references: list[list[str]], beta: float = 1.2
) -> float:
    """ROUGE-L as the E2E scripts (pycocoevalcap) compute it, times 100.

    Per segment: the longest common subsequence of lowercase whitespace
    tokens with each reference; the best precision and the best recall
    over the references combine into F(beta); the segments' mean.
    """
    scores = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        tokens = hyp.lower().split()
        if not tokens:
            scores.append(0.0)
            continue
        precision = recall = 0.0
        for ref in refs:
            words = ref.lower().split()
            common = _lcs(tokens, words)
            precision = max(precision, common / len(tokens))
            recall = max(recall, common / max(len(words), 1))
        if precision and recall:
            f = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
        else:
            f = 0.0
        scores.append(f)
    return 100.0 * sum(scores) / len(scores)


def prompt_of(mr: str) -> str:
    """The prompt string of an MR (the completion follows after the newline)."""
    return f"{mr}\n"


def _write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _run_worker(kind: str, spec: dict, out: str, backend: str) -> dict:
    """`kind` in a child process (torch for trl and decode); its result."""
    spec_path = os.path.join(out, f"{kind}_spec.json")
    result_path = os.path.join(out, f"{kind}_result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["KERAS_BACKEND"] = backend if kind in ("lora", "full") else "torch"
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, spec_path]
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise RuntimeError(f"the {kind} run failed (exit {done.returncode})")
    with open(result_path) as f:
        result = json.load(f)
    result["process_seconds"] = round(time.perf_counter() - start, 1)
    result["process_cpu_seconds"] = round(_children_cpu() - cpu, 1)
    return result


def _children_cpu() -> float:
    # CPU seconds of finished children: on a shared machine, what a run
    # costs apart from the wait for cores.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="?", help="E2E CSV (mr, ref) to train on")
    p.add_argument("--out", help="output directory")
    p.add_argument("--test", help="a CSV of the same columns to evaluate on")
    p.add_argument("--held-out", type=int, default=100, help="MRs held out")
    p.add_argument("--limit", type=int, help="use only the first N rows of DATA")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--full-learning-rate", type=float, help="default: --learning-rate")
    p.add_argument(
        "--lora-learning-rate",
        type=float,
        help="the LoRA runs' rate (lora and trl); default: --learning-rate",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        help="LoRA targets for the sft recipe (roles, all-linear, "
        "token_embedding); default: the family's",
    )
    p.add_argument(
        "--full-freeze",
        nargs="+",
        metavar="LAYER",
        help="backbone layers the full run keeps frozen (e.g. token_embedding "
        "position_embedding); default: none",
    )
    p.add_argument(
        "--no-base",
        action="store_true",
        help="do not decode the base model (its scores do not change)",
    )
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--examples", type=int, default=10, help="generations shown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.worker is None and (args.data is None or args.out is None):
        p.error("give DATA and --out DIR")
    if "trl" in args.runs and "token_embedding" in (args.targets or []):
        p.error(
            "--targets token_embedding: the trl run adapts projections only; "
            "give --runs without trl"
        )
    return args


def main(argv=None) -> int:
    """Run the benchmark; print the table."""
    args = parse_args(argv)
    if args.worker is not None:
        return e2e_runs.worker(*args.worker)
    start = time.perf_counter()
    rows = read_rows(args.data)[: args.limit]
    if args.test is not None:
        train_rows, held = rows, group_by_mr(read_rows(args.test))
        source = f"{args.data} (all) -> {args.test}"
    else:
        train_rows, held = split_by_mr(rows, args.held_out, args.seed)
        source = f"{args.data}: {len(held)} MRs held out (seed {args.seed})"
    os.makedirs(args.out, exist_ok=True)
    data_dir = os.path.join(args.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_path = os.path.join(data_dir, "train.jsonl")
    eval_path = os.path.join(data_dir, "eval.jsonl")
    _write_jsonl(
        train_path, ({"prompt": prompt_of(m), "completion": r} for m, r in train_rows)
    )
    _write_jsonl(
        eval_path,
        (
            {"prompt": prompt_of(m), "completion": r}
            for m, refs in held.items()
            for r in refs
        ),
    )
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    base = os.path.join(args.out, "base_hf")
    settings = {
        "steps": args.steps,
        "batch": args.batch,
        "rank": args.rank,
        "alpha": args.alpha,
        "learning_rate": args.learning_rate,
        "full_learning_rate": args.full_learning_rate or args.learning_rate,
        "lora_learning_rate": args.lora_learning_rate or args.learning_rate,
        "targets": args.targets,
        "full_freeze": args.full_freeze,
        "max_length": args.max_length,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "optimizer": "AdamW (Keras defaults: weight decay 0.004, epsilon 1e-7), "
        "constant rate, no clipping",
        "dropout": 0.0,
        "keras_backend": backend,
    }
    prep = e2e_runs.prepare(base, train_path, eval_path, args.out, settings)
    settings.update(prep["settings"])
    spec = {
        "base": base,
        "train": train_path,
        "eval": eval_path,
        "out": args.out,
        "order": prep["order"],
        **settings,
    }
    results, seconds = {}, {"prepare": round(time.perf_counter() - start, 1)}
    cpu = {"prepare": round(time.process_time(), 1)}
    for kind in args.runs:
        results[kind] = _run_worker(kind, spec, args.out, backend)
        seconds[kind] = results[kind]["process_seconds"]
        cpu[kind] = results[kind]["process_cpu_seconds"]
        print(f"{kind}: trained in {seconds[kind]} s", flush=True)
    mrs = list(held)
    decode_spec = {
        **spec,
        "prompts": [prompt_of(m) for m in mrs],
        "models": ({} if args.no_base else {"base": {}})
        | {k: results[k]["model"] for k in args.runs},
    }
    decoded = _run_worker("decode", decode_spec, args.out, backend)
    seconds["decode"] = decoded["process_seconds"]
    cpu["decode"] = decoded["process_cpu_seconds"]
    references = [held[m] for m in mrs]
    table = {}
    for name, outputs in decoded["generations"].items():
        table[name] = {
            "bleu": round(corpus_bleu(outputs, references), 2),
            "rouge_l": round(rouge_l(outputs, references), 2),
            "eval_loss": round(decoded["eval_loss"][name], 4),
            "empty_generations": sum(not o.strip() for o in outputs),
        }
        table[name].update(results.get(name, {}).get("summary", {}))
    seconds["total"] = round(time.perf_counter() - start, 1)
    report = {
        "data": source,
        "train_rows": len(train_rows),
        "held_out_mrs": len(mrs),
        "held_out_references": sum(len(r) for r in references),
        "settings": settings,
        "runs": table,
        "seconds": seconds,
        "cpu_seconds": cpu | {"total": round(sum(cpu.values()), 1)},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "generations": [
            {"mr": m, "references": held[m]}
            | {name: decoded["generations"][name][i] for name in table}
            for i, m in enumerate(mrs)
        ],
    }
    with open(os.path.join(args.out, RESULTS), "w") as f:
        json.dump(report, f, indent=1)
    markdown = e2e_runs.markdown(report, args.examples)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
