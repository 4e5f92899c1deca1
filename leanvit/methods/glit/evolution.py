"""GLiT's evolutionary architecture search (paper Sec. 3.3), hierarchical or flat, under a parameter / MAC budget.

GLiT searches in two levels over its supernet: first the distribution of global and local heads over the blocks
(every low-level choice at its default), then, for the winning distribution, the sizes inside each block. A flat
search over the joint space is the baseline. Each level is the evolutionary loop SPOS uses (Guo et al., ECCV 2020):
a random population within the budget, then every generation the top-k candidates seen so far are parents of
mutated and crossed-over children. The paper publishes none of its search hyper-parameters: every one of them is a
field of `EvolutionSettings`.

Every candidate is scored once: scores go to a `CandidateLog` (one JSON line per candidate, flushed as it is written),
and every random draw is a function of the seed, the stage and the generation. A killed search therefore resumes by
replaying the same draws, with the logged scores standing in for evaluations, and continues where it stopped,
mid-generation included.
"""

import dataclasses
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from leanvit.errors import RunDirectoryError, UsageError
from leanvit.io.files import atomic_write
from leanvit.models.glit import BlockArch, SearchSpace

__all__ = ['STAGES', 'Budget', 'Candidate', 'CandidateLog', 'EvolutionSearch', 'EvolutionSettings', 'ranked']

Arch = tuple[BlockArch, ...]
STAGES = ('high', 'low', 'flat')


@dataclass(frozen=True)
class Budget:
    """Upper bounds a candidate must meet: multiply-accumulates per image, parameters and predicted milliseconds
    per call on this machine (`leanvit.methods.glit.latency`) (None: no bound)."""
    macs: float | None = None
    params: int | None = None
    latency_ms: float | None = None

    def admits(self, macs: float, params: int, latency_ms: float | None = None) -> bool:
        return (self.macs is None or macs <= self.macs) and (self.params is None or params <= self.params) and \
            (self.latency_ms is None or (latency_ms is not None and latency_ms <= self.latency_ms))

    def __str__(self) -> str:
        parts = ([f'{self.macs / 1e9:.4g} GMACs'] if self.macs is not None else []) + \
            ([f'{self.params / 1e6:.4g} M params'] if self.params is not None else []) + \
            ([f'{self.latency_ms:.4g} ms'] if self.latency_ms is not None else [])
        return ' and '.join(parts) or 'no budget'


@dataclass(frozen=True)
class EvolutionSettings:
    """The evolutionary loop's hyper-parameters (GLiT publishes none; SPOS used population 50, top-10 parents, 25
    mutations and 25 crossovers per generation, mutation probability 0.1, 20 generations).

    Attributes:
        population: Candidates scored per generation (the first generation is drawn at random).
        parents: The best candidates seen so far that breed the next generation.
        mutation_prob: Chance of each block of a mutated child to be drawn again.
        crossover_share: Share of each generation made by crossover (the rest by mutation, and at random if the
            parents cannot make enough new candidates).
        generations: Generations of a flat search; a hierarchical one spends half on each level, so both score the
            same number of candidates.
        seed: Seed of every random draw.
        max_draws: Draws per wanted candidate before giving up (a budget few architectures meet).
    """
    population: int = 50
    parents: int = 10
    mutation_prob: float = 0.1
    crossover_share: float = 0.5
    generations: int = 20
    seed: int = 0
    max_draws: int = 1000

    def __post_init__(self):
        for name in ('population', 'parents', 'generations', 'max_draws'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be at least 1, got {getattr(self, name)}')
        for name in ('mutation_prob', 'crossover_share'):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f'{name} must be in [0, 1], got {getattr(self, name)}')


@dataclass(frozen=True)
class Candidate:
    """An architecture and its score; ``score`` is None for a candidate whose score was not finite (a forward that
    overflowed): it is logged so that a resume does not score it again, and never ranked. ``latency_ms`` is the
    latency table's prediction, None in a search without one."""
    arch: Arch
    score: float | None
    macs: float
    params: int
    stage: str
    generation: int
    latency_ms: float | None = None

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), arch=[dataclasses.asdict(b) for b in self.arch])

    @classmethod
    def from_json(cls, record, where: str = 'candidate') -> 'Candidate':
        """The candidate of a log record, every field checked; a ValueError names ``where`` and the field."""
        fields = [f.name for f in dataclasses.fields(cls)]
        # Logs of searches without a latency budget, written before candidates had a latency, lack the field.
        if not isinstance(record, dict) or set(record) not in (set(fields), set(fields) - {'latency_ms'}):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f'{where} must be a JSON object with the fields {fields}, got {got}')
        arch = record['arch']
        if not isinstance(arch, list) or not arch:
            raise ValueError(f'{where}: field "arch" must be a non-empty list of blocks, got {arch!r}')
        blocks = tuple(BlockArch.from_dict(block, f'{where}: arch block {i}') for i, block in enumerate(arch))
        for name, kind, low in (('score', float, None), ('macs', float, 0), ('params', int, 0),
                                ('generation', int, 0), ('latency_ms', float, 0)):
            value = record.get(name)
            if value is None and name in ('score', 'latency_ms'):
                continue
            # Bounded (1e30 is far above any model's MACs), so that a crafted integer never overflows a float.
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e30 \
                and math.isfinite(value)
            if not number or (kind is int and not isinstance(value, int)) or (low is not None and value < low):
                expected = ('an integer' if kind is int else 'a finite number') + (f' >= {low}' if low is not None
                                                                                  else '')
                raise ValueError(f'{where}: field "{name}" must be {expected}'
                                 + (' or null' if name in ('score', 'latency_ms') else '')
                                 + f', got {value!r:.40}')
        if record['stage'] not in STAGES:
            raise ValueError(f'{where}: field "stage" must be one of {list(STAGES)}, got {record["stage"]!r}')
        return cls(**dict(record, arch=blocks))


class CandidateLog:
    """Every scored candidate, one JSON line each, appended and flushed to disk as it is scored.

    A kill can cut the last line short. Opening the log for writing drops that line (its candidate is scored again)
    by rewriting the file atomically, and says so, so that the next record starts on a line of its own and the log
    stays readable for every later resume. Any other line that is not a valid record is an error naming the line and
    field. ``persist=False`` (the other processes of a distributed search) reads the file but leaves the writing to
    one process.
    """

    def __init__(self, path: str | Path, persist: bool = True):
        self.path, self.persist = Path(path), persist
        self.candidates: dict[Arch, Candidate] = {}
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise RunDirectoryError(f'{self.path} is not a file; it should be the search\'s candidate log')
        try:
            text = self.path.read_text()
        except UnicodeDecodeError:
            raise RunDirectoryError(f'{self.path} is not UTF-8 text; it is corrupt or was not written by '
                                    f'leanvit') from None
        lines = text.splitlines()
        kept = len(lines)
        for i, line in enumerate(lines):
            where = f'{self.path} line {i + 1}'
            try:
                candidate = Candidate.from_json(json.loads(line), where)
            except RecursionError:  # JSON nested deeper than Python's parser goes: no record of leanvit's is
                e = ValueError(f'{where} nests deeper than a candidate record')
                if i == len(lines) - 1 and not text.endswith('\n'):
                    kept = i
                    break
                raise RunDirectoryError(f'{e}; the file is corrupt or was not written by leanvit') from None
            except ValueError as e:
                if i == len(lines) - 1 and not text.endswith('\n'):
                    kept = i  # the write a kill interrupted: every record ends with a newline
                    break
                message = str(e) if str(e).startswith(where) else f'{where} is not a candidate record ({e})'
                raise RunDirectoryError(f'{message}; the file is corrupt or was not written by leanvit') from None
            self.candidates[candidate.arch] = candidate
        if persist and (kept < len(lines) or (lines and not text.endswith('\n'))):
            whole = ''.join(line + '\n' for line in lines[:kept])
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(whole))
            if kept < len(lines):
                print(f'{self.path}: dropped its last line, a record cut short by a kill ({lines[-1][:60]!r}); '
                      f'that candidate is scored again', flush=True)

    def __contains__(self, arch: Arch) -> bool:
        return arch in self.candidates

    def __getitem__(self, arch: Arch) -> Candidate:
        return self.candidates[arch]

    def add(self, candidate: Candidate) -> None:
        if candidate.score is not None and not math.isfinite(candidate.score):
            raise ValueError(f'a logged score must be finite or None, got {candidate.score}')
        self.candidates[candidate.arch] = candidate
        if not self.persist:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(candidate.to_json(), allow_nan=False) + '\n')
            f.flush()
            os.fsync(f.fileno())


def ranked(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates with a score, best first; of equal scores the cheaper (MACs, then parameters) first."""
    return sorted((c for c in candidates if c.score is not None), key=lambda c: (-c.score, c.macs, c.params))


class EvolutionSearch:
    """The evolutionary loop over one stage of GLiT's search.

    Args:
        space: The search space.
        depth: Blocks per architecture.
        num_heads: Heads per block.
        score: Scores of a list of architectures (higher is better), e.g. held-out top-1 of the supernet on each.
        cost: ``(macs, params)`` of an architecture, or ``(macs, params, predicted milliseconds)``.
        budget: The bounds every candidate meets.
        settings: The loop's hyper-parameters.
        log: Where scores are kept (and found again on resume).
        progress: Called once per candidate that gets a score (a progress bar's update).
        chunk: Candidates scored per call of ``score`` (and logged together): the processes of a distributed search,
            which score one each.
    """

    def __init__(self, space: SearchSpace, depth: int, num_heads: int, score: Callable[[list[Arch]], list[float]],
                 cost: Callable[[Arch], tuple[float, int]], budget: Budget, settings: EvolutionSettings,
                 log: CandidateLog, progress: Callable[[], None] = lambda: None, chunk: int = 1):
        self.space, self.depth, self.num_heads = space, depth, num_heads
        self.score, self.cost, self.budget, self.settings = score, cost, budget, settings
        self.log, self.progress, self.chunk = log, progress, chunk
        self.unscored: list[Candidate] = []  # candidates whose score was not finite, left out of every ranking

    def run(self, stage: str, generations: int, global_heads: Sequence[int] | None = None) -> list[Candidate]:
        """Candidates of ``stage`` scored over ``generations`` generations, best first.

        ``'high'``: the global heads of each block, low-level choices at their defaults. ``'low'``: the low-level
        choices, the global heads fixed to ``global_heads``. ``'flat'``: everything at once.
        """
        if stage not in STAGES:
            raise ValueError(f'stage must be one of {STAGES}, got {stage!r}')
        if (stage == 'low') != (global_heads is not None):
            raise ValueError('the low-level stage, and only it, takes the global heads of every block')
        heads = self.space.global_head_choices(self.num_heads)

        def draw_block(i: int, rng: random.Random) -> BlockArch:
            if stage == 'high':
                return self.space.default_block(rng.choice(heads), self.num_heads)
            return self.space.sample_block(global_heads[i] if stage == 'low' else rng.choice(heads), self.num_heads,
                                           rng)

        seen: list[Candidate] = []
        for generation in range(generations):
            rng = random.Random(f'{self.settings.seed}:{stage}:{generation}')
            parents = ranked(seen)[:self.settings.parents]
            population = self._breed(parents, rng, draw_block, {c.arch for c in seen})
            seen += self._scored(population, stage, generation)
        self.unscored += [c for c in seen if c.score is None]
        return ranked(seen)

    def _breed(self, parents: list[Candidate], rng: random.Random, draw_block, taken: set[Arch]) -> list[Arch]:
        """One generation: children of ``parents`` (crossover, then mutation), topped up at random, all new and
        within the budget."""
        settings, children = self.settings, []
        wanted = settings.population
        crossovers = round(wanted * settings.crossover_share) if len(parents) > 1 else 0
        makers = [(crossovers,
                   lambda: tuple(rng.choice(pair) for pair in zip(*(c.arch for c in rng.sample(parents, 2))))),
                  (wanted - crossovers if parents else 0,
                   lambda: tuple(draw_block(i, rng) if rng.random() < settings.mutation_prob else block
                                 for i, block in enumerate(rng.choice(parents).arch))),
                  (wanted, lambda: tuple(draw_block(i, rng) for i in range(self.depth)))]
        for count, make in makers:
            goal = min(wanted, len(children) + count)
            for _ in range(settings.max_draws * max(goal - len(children), 0)):
                if len(children) >= goal:
                    break
                arch = make()
                if arch not in taken and self.budget.admits(*self.cost(arch)):
                    taken.add(arch)
                    children.append(arch)
        if not children:
            raise UsageError(f'no new architecture within {self.budget} in {settings.max_draws} draws: the budget '
                             f'is below what the space offers, or the stage has no candidates left')
        return children

    def _scored(self, population: list[Arch], stage: str, generation: int) -> list[Candidate]:
        for start in range(0, len(population), self.chunk):
            part = population[start:start + self.chunk]
            new = [arch for arch in part if arch not in self.log]
            for arch, score in zip(new, self.score(new) if new else []):
                macs, params, *latency_ms = self.cost(arch)
                score = float(score)
                self.log.add(Candidate(arch, score if math.isfinite(score) else None, macs, params, stage, generation,
                                       *latency_ms))
            for _ in part:
                self.progress()
        return [self.log[arch] for arch in population]
