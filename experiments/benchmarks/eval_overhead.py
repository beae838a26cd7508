"""Evaluation overhead per candidate: lm-eval's simple_evaluate vs the evomerge evaluator vs bare forwards.

On the zoo's tasks (zoo_add, zoo_reverse, zoo_sort; the first `--limit` holdout documents of
each, 150 requests by default) and tiny random zoo Llamas (one per candidate, different seeds;
`--models tiny` uses the trained models of the zoo's `tiny` preset instead, building it first
if needed, so that accuracies are not all zero), time per candidate:
  (a) `lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=..., limit=...)`
      called per candidate as mergekit-evolve does (its TaskManager, ~16 s to build with lm-eval's
      own tasks, is built once beforehand and timed separately);
  (b) `evaluator.evaluate(model, tok, "holdout")` of an evaluator built once (`zoo_all`);
  (c) the model's bare forward passes over the same requests (the evaluator's own batches,
      de-duplicated and padded: the least any evaluator must run).
Torch runs one thread by default (`--threads`): on the shared 2-core machine two threads make
every timing a measure of the neighbours' load. Each candidate is timed `--repeats` times, interleaved, and the minimum kept (the machine is
shared); the per-candidate figures are medians over candidates. Scores are compared per
document: the 0/1 acc exactly, the raw log-likelihoods to rtol 1e-4 and the greedy flags exactly.
Ends with `eval_over_forward: X` ((b) / (c)) and `scores_equal_simple_evaluate: true|false`.

    .venv/bin/python experiments/benchmarks/eval_overhead.py [--candidates 5] [--repeats 5] [--limit 50]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

TASKS = ["zoo_add", "zoo_reverse", "zoo_sort"]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=50, help="holdout documents per task")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default); 1 keeps timings stable on a shared 2-core machine"
    )
    parser.add_argument("--models", choices=("random", "tiny"), default="random", help="candidates: random zoo Llamas or the tiny zoo")
    parser.add_argument("--full-task-manager", action="store_true", help="also time lm-eval's full TaskManager (~16 s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    logging.getLogger("datasets").setLevel(logging.ERROR)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate import build_evaluator
    from evomerge.evaluate.forward import run_bare
    from evomerge.evaluate.lmeval_tasks import task_manager
    from evomerge.resources import builtin_dir
    from evomerge.zoo.lm import ModelSpec, new_model
    from evomerge.zoo.tokenizer import build_tokenizer

    include = (str((builtin_dir("evaluators") / "tasks").resolve()),)
    if args.full_task_manager:
        t_tm, _ = timed(lambda: task_manager(include, True))
        print(f"task_manager_build_seconds (lm-eval + local tasks): {t_tm:.2f}")
    t_local, manager = timed(lambda: task_manager(include, False))
    print(f"task_manager_build_seconds (local tasks only): {t_local:.2f}")
    t_build, ev = timed(lambda: build_evaluator("zoo_all", {"holdout_limit": args.limit, "include_defaults": False}))
    print(f"evaluator_build_seconds: {t_build:.2f}")

    tok = build_tokenizer()
    if args.models == "tiny":
        from transformers import AutoModelForCausalLM

        from evomerge.zoo import build_zoo, list_zoo_models

        root = build_zoo("tiny", progress=print)
        models = [AutoModelForCausalLM.from_pretrained(root / name).eval() for name in list_zoo_models("tiny")]
    else:
        models = [new_model(ModelSpec(init_std=0.3), torch.Generator().manual_seed(100 + i)).eval() for i in range(args.candidates)]
    ev.evaluate(models[0], tok, "holdout")  # first call tokenizes and plans (once per worker)
    plan = next(iter(ev._plans.values()))
    n_requests = sum(len(d.instances) for t in ev.tasks.values() for d in t.docs["holdout"][: args.limit])
    print(f"requests_per_candidate: {n_requests} in {len(plan.batches)} batches, {plan.n_tokens} tokens")

    accuracies = []
    t_a, t_b, t_c = [], [], []
    equal = True
    for model in models:
        best_a = best_b = best_c = float("inf")
        for _ in range(args.repeats):
            lm = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=64)
            dt, ref = timed(
                lambda lm=lm: lm_eval.simple_evaluate(
                    model=lm, tasks=TASKS, task_manager=manager, limit=args.limit, log_samples=True, bootstrap_iters=0
                )
            )
            best_a = min(best_a, dt)
            dt, ours = timed(lambda model=model: ev.evaluate(model, tok, "holdout"))
            best_b = min(best_b, dt)
            dt, _ = timed(lambda model=model: run_bare(model, plan))
            best_c = min(best_c, dt)
        t_a.append(best_a)
        t_b.append(best_b)
        t_c.append(best_c)
        assert not ours.failed, ours.error
        accuracies.append({t: round(ours.task_scores[t], 3) for t in TASKS})
        for task in TASKS:
            samples = sorted(ref["samples"][task], key=lambda s: s["doc_id"])
            acc_ok = np.array_equal(ours.per_sample[task], [s["acc"] for s in samples])
            ids_ok = ours.doc_ids[task] == [f"holdout:{s['doc_id']}" for s in samples]
            resps = [d.instances[0].resps[0] for d in ev.tasks[task].docs["holdout"][: args.limit]]
            theirs = [s["resps"][0][0] for s in samples]
            ll_ok = np.allclose([r[0] for r in resps], [t[0] for t in theirs], rtol=1e-4, atol=1e-4)
            greedy_ok = [r[1] for r in resps] == [t[1] for t in theirs]
            agg_ok = abs(ours.task_scores[task] - ref["results"][task]["acc,none"]) == 0
            equal = equal and acc_ok and ids_ok and ll_ok and greedy_ok and agg_ok

    a, b, c = statistics.median(t_a), statistics.median(t_b), statistics.median(t_c)
    print(f"accuracies per candidate: {accuracies}")
    print(f"candidates: {len(models)}, repeats: {args.repeats} (min per candidate, median over candidates)")
    print(f"torch_threads: {torch.get_num_threads()}")
    print(f"(a) simple_evaluate_per_candidate_seconds: {a:.4f}")
    print(f"(b) evomerge_evaluator_per_candidate_seconds: {b:.4f}")
    print(f"(c) bare_forward_per_candidate_seconds: {c:.4f}")
    print(f"simple_evaluate_over_evaluator: {a / b:.1f}")
    print(f"eval_over_forward: {b / c:.3f}")
    print(f"scores_equal_simple_evaluate: {'true' if equal else 'false'}")


if __name__ == "__main__":
    main()
