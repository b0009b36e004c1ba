"""Instruction sets phrased from the synthetic tasks: prompt/response records, nothing downloaded.

Each record is {"task", "prompt", "response"}: the task's context and question as text, the answer
as text, generated from the task's own sample (default settings) so the answer is the task's
answer. A mixture picks a task per record from `seed`. `tools/make_sft_data.py` writes them as JSONL.

    depo   "Edges: n3 -> n7 ; n7 -> n1 ; ...\\nStart at n3 and follow 2 edges. Where do you end?"  "n1"
    mano   "Compute mod 23 (prefix notation): x - 6 11 3"  "4"
    brevo  "Edges (a -> b: b depends on a): ...\\nList every node n5 depends on, each after its parents."
           "n2 n9 n5 ..."  (the one order the generator drew; SFT exact match accepts only it)
"""

from __future__ import annotations

import numpy as np

from layerjax.config import BrevoConfig, DepoConfig, ManoConfig
from layerjax.data import brevo, depo, mano

TASKS = ("depo", "mano", "brevo")


def _depo_record(task: depo.DepoTask, index: int, seed: int) -> dict:
    tokens = task.sample(index, seed)["tokens"]
    query = int(np.flatnonzero(tokens == depo.QUERY)[0])
    hop_at = query + 1 + int(np.flatnonzero(tokens[query + 1:] < task.name_base)[0])
    k = int(tokens[hop_at]) - depo.HOP_BASE + 1
    answer_end = hop_at + 2 + int(np.flatnonzero(tokens[hop_at + 2:] == depo.SEP)[0])
    return {"prompt": f"Edges: {task.decode(tokens[1:query])}\nStart at {task.decode(tokens[query + 1:hop_at])} "
                      f"and follow {k} edge{'s' if k > 1 else ''}. Where do you end?",
            "response": task.decode(tokens[hop_at + 2:answer_end])}


def _mano_record(task: mano.ManoTask, index: int, seed: int) -> dict:
    tokens = task.sample(index, seed)["tokens"]
    equals = int(np.flatnonzero(tokens == mano.EQUALS)[0])
    return {"prompt": f"Compute mod {task.cfg.modulus} (prefix notation): {task.decode(tokens[2:equals])}",
            "response": task.decode(tokens[equals + 1:equals + 2])}


def _brevo_record(task: brevo.BrevoTask, index: int, seed: int) -> dict:
    tokens = task.sample(index, seed)["tokens"]
    query = int(np.flatnonzero(tokens == brevo.QUERY)[0])
    answer_end = int(np.flatnonzero(tokens == brevo.SEP)[-1])
    return {"prompt": f"Edges (a -> b: b depends on a): {task.decode(tokens[1:query])}\n"
                      f"List every node {task.decode(tokens[query + 1:query + 2])} depends on, each after its parents.",
            "response": task.decode(tokens[query + 3:answer_end])}


def make_records(task: str, n: int, seed: int = 0) -> list[dict]:
    """`n` records of `task` ("depo", "mano", "brevo" or "mix"), the same for the same seed."""
    if task not in (*TASKS, "mix"):
        raise ValueError(f"task {task!r} is not one of {[*TASKS, 'mix']}")
    if n < 0 or not 0 <= seed < 2**32:
        raise ValueError(f"need n >= 0 and 0 <= seed < 2**32, got n={n}, seed={seed}")
    makers = {"depo": (_depo_record, depo.DepoTask(DepoConfig(queries=1))),
              "mano": (_mano_record, mano.ManoTask(ManoConfig())),
              "brevo": (_brevo_record, brevo.BrevoTask(BrevoConfig()))}
    names = np.random.default_rng(seed).choice(TASKS, size=n) if task == "mix" else [task] * n
    records = []
    for index, name in enumerate(names):
        make, generator = makers[str(name)]
        records.append({"task": str(name), **make(generator, index, seed)})
    return records
