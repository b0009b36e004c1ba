"""Instruction sets phrased from the synthetic tasks: prompt/response records, nothing downloaded.

Each record is {"task", "prompt", "response"}: the task's context and question as text, the answer
as text, generated from the task's own sample (default settings, or those given) so the answer is the
task's answer. A mixture picks a task per record from `seed`. `tools/make_sft_data.py` writes them as JSONL.

    depo   "Edges: n3 -> n7 ; n7 -> n1 ; ...\\nStart at n3 and follow 2 edges. Where do you end?"  "n1"
    mano   "Compute mod 23 (prefix notation): x - 6 11 3"  "4"
    brevo  "Edges (a -> b: b depends on a): ...\\nList every node n5 depends on, each after its parents."
           "n2 n9 n5 ..."  (the one order the generator drew; SFT exact match accepts only it)

and three string tasks that read the same kind of input and conflict in what they answer, so a
mixture of them needs the instruction to decide (the fine-tuning study's mixture):

    copy     "Copy: dbjag"     "dbjag"
    reverse  "Reverse: dbjag"  "gajbd"
    sort     "Sort: dbjag"     "abdgj"

over random strings of `min_len`..`max_len` letters from the first `alphabet` of a..z (StringConfig).
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np

from layerjax.config import BrevoConfig, DepoConfig, ManoConfig
from layerjax.data import brevo, depo, mano
from layerjax.data.seeding import keyed_generator

REASONING_TASKS = ("depo", "mano", "brevo")  # "mix"
STRING_TASKS = ("copy", "reverse", "sort")
TASKS = REASONING_TASKS + STRING_TASKS


@dataclasses.dataclass(frozen=True)
class StringConfig:
    """Random strings for the copy / reverse / sort tasks."""

    min_len: int = 3
    max_len: int = 8
    alphabet: int = 10  # letters a.. (at most 26); letters may repeat within a string

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len or not 1 <= self.alphabet <= 26:
            raise ValueError(f"need 1 <= min_len <= max_len and 1 <= alphabet <= 26, got {self}")


class StringTask:
    """Draws a task's string from (seed, record index), independently of the other records."""

    _STREAM = 7  # a seeding stream of its own, apart from the token tasks' train/val streams
    _ANSWER = {"copy": lambda s: s, "reverse": lambda s: s[::-1], "sort": lambda s: "".join(sorted(s))}

    def __init__(self, name: str, cfg: StringConfig):
        self.name, self.cfg = name, cfg

    def record(self, index: int, seed: int) -> dict:
        rng = keyed_generator(int(seed), self._STREAM, int(index))
        length = int(rng.integers(self.cfg.min_len, self.cfg.max_len + 1))
        text = "".join(chr(ord("a") + int(i)) for i in rng.integers(0, self.cfg.alphabet, length))
        return {"prompt": f"{self.name.capitalize()}: {text}", "response": self._ANSWER[self.name](text)}


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


_CONFIGS = {"depo": DepoConfig, "mano": ManoConfig, "brevo": BrevoConfig,
            **{name: StringConfig for name in STRING_TASKS}}
_MAKERS = {"depo": (_depo_record, depo.DepoTask), "mano": (_mano_record, mano.ManoTask),
           "brevo": (_brevo_record, brevo.BrevoTask),
           **{name: (lambda task, index, seed: task.record(index, seed),
                     lambda cfg, name=name: StringTask(name, cfg)) for name in STRING_TASKS}}


def task_config(task: str, settings: dict | None = None):
    """The generator config of `task` with `settings` ({field: value}) applied; depo asks one query
    per record. Unknown fields raise ValueError naming the valid ones."""
    cls = _CONFIGS[task]
    settings = {"queries": 1, **(settings or {})} if task == "depo" else dict(settings or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"{task} has no setting {unknown}; its settings are {sorted(fields)}")
    return cls(**settings)


def make_records(task: str | typing.Sequence[str], n: int, seed: int = 0,
                 settings: dict[str, dict] | None = None) -> list[dict]:
    """`n` records of `task` (one of TASKS), of "mix" (depo, mano, brevo), or of a list of tasks
    (each record draws its task uniformly from the list, from `seed`); the same arguments give the
    same records. `settings` maps a task to generator settings, e.g. {"depo": {"max_hops": 2}}."""
    tasks = list(REASONING_TASKS) if task == "mix" else [task] if isinstance(task, str) else list(task)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"task {bad or task!r} is not one of {[*TASKS, 'mix']}")
    if n < 0 or not 0 <= seed < 2**32:
        raise ValueError(f"need n >= 0 and 0 <= seed < 2**32, got n={n}, seed={seed}")
    settings = settings or {}
    unused = sorted(set(settings) - set(tasks))
    if unused:
        raise ValueError(f"settings given for {unused}, which are not among the tasks {tasks}")
    makers = {t: (_MAKERS[t][0], _MAKERS[t][1](task_config(t, settings.get(t)))) for t in tasks}
    names = np.random.default_rng(seed).choice(tasks, size=n) if len(tasks) > 1 else tasks * n
    records = []
    for index, name in enumerate(names):
        make, generator = makers[str(name)]
        records.append({"task": str(name), **make(generator, index, seed)})
    return records
