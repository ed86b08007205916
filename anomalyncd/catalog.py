"""The defect catalog: what the user made of the discovered clusters (``classes.yaml``).

``classes.yaml`` lives beside ``params.yaml`` and maps a discovered cluster id to one of::

    3: {name: crack}       # the class's name
    4: {same_as: 3}        # cluster 4 is the same defect type as cluster 3 (merged into it)
    1: {reject: true}      # not a defect (false alarms)

A cluster left out is a class of its own, named by its matched true type where the run had
ground truth, else ``cluster <id>``; a missing or empty file means no curation. Each cluster
resolves to a *curated class* (:func:`resolve`): the cluster at the end of its ``same_as`` chain
(its root) with that cluster's name, or "not a defect" when the root is rejected.

Pure functions on :class:`Catalog`; :func:`load_catalog` / :func:`save_catalog` do the I/O
(written atomically). Bad input is one ``InputError`` "classes.yaml: <key> ...; <fix>".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml

from .config import load_strict_yaml, path_component
from .io import InputError, atomic_path

CATALOG_FILE = Path("classes.yaml")
REJECTED = "not a defect"  # the name of a rejected cluster's images
REJECTED_ID = -2  # the curated label of a rejected cluster's images (-1: no anomaly found)
RESERVED = (REJECTED, "no anomaly found", "normal")
KEYS = ("name", "same_as", "reject")

HEADER = """\
# The defect catalog: one line per discovered cluster you curated (anomalyncd classes --help).
#   <cluster>: {name: <name>}      the class's name
#   <cluster>: {same_as: <other>}  the same defect type as cluster <other> (merged)
#   <cluster>: {reject: true}      not a defect (false alarms)
# A cluster left out keeps its own class, named by its matched true type, else "cluster <id>".
# `dvc repro` then reruns merge, calibrate and evaluate only.
"""


@dataclass(frozen=True)
class Entry:
    """One cluster's curation: exactly one of ``name``, ``same_as`` or ``reject``."""

    name: str = ""
    same_as: int | None = None
    reject: bool = False

    def as_dict(self) -> dict:
        if self.name:
            return {"name": self.name}
        return {"same_as": self.same_as} if self.same_as is not None else {"reject": True}


@dataclass(frozen=True)
class Catalog:
    """The curation of a run: cluster id -> :class:`Entry` (clusters left out: none)."""

    entries: dict[int, Entry] = field(default_factory=dict)
    where: str = str(CATALOG_FILE)

    def set(self, cluster: int, entry: Entry | None) -> "Catalog":
        """A copy with ``cluster``'s entry replaced (``None``: removed), checked (:func:`check`)."""
        entries = {k: v for k, v in self.entries.items() if k != cluster}
        if entry is not None:
            entries[cluster] = entry
        out = replace(self, entries=dict(sorted(entries.items())))
        check(out)
        return out


@dataclass(frozen=True)
class CuratedClass:
    """What cluster ``cluster`` became: its ``root`` (the cluster it was merged into, itself if
    none), the curated class's ``name`` (:data:`REJECTED` if rejected) and the cluster's
    matched true type (None without ground truth or match)."""

    cluster: int
    root: int
    name: str
    rejected: bool = False
    matched: str | None = None

    @property
    def label(self) -> int:
        """The curated label of the cluster's images: its root, :data:`REJECTED_ID` if rejected."""
        return REJECTED_ID if self.rejected else self.root


# -- parsing and checks ----------------------------------------------------------------------


def parse_catalog(text: str, where: str = str(CATALOG_FILE)) -> Catalog:
    """The :class:`Catalog` in ``text`` (YAML), checked without knowing the run (:func:`check`):
    bad YAML, a key given twice, a key that is not a cluster id, an unknown or missing field,
    a bad name, a merge cycle or a name given twice are an ``InputError`` naming ``where``."""
    data = load_strict_yaml(text, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected <cluster>: {{name: ...}} lines, got a {type(data).__name__}; see `anomalyncd classes --help`")
    entries = {}
    for key, value in data.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise InputError(f"{where}: {key!r}: not a cluster id; keys are the cluster numbers of `anomalyncd classes show`")
        entries[key] = _entry(value, f"{where}: {key}")
    cat = Catalog(dict(sorted(entries.items())), where)
    check(cat)
    return cat


def _entry(value: object, where: str) -> Entry:
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected {{name: <name>}}, {{same_as: <cluster>}} or {{reject: true}}, got {value!r}")
    unknown = sorted(map(str, set(value) - set(KEYS)))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known keys: {list(KEYS)}")
    if len(value) != 1:
        given = sorted(map(str, value)) or "none"
        raise InputError(f"{where}: give exactly one of {list(KEYS)}, got {given}")
    (key, v), = value.items()
    if key == "name":
        return Entry(name=check_name(v, f"{where}.name"))
    if key == "same_as":
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"{where}.same_as: expected a cluster id, got {v!r}")
        return Entry(same_as=v)
    if v is not True:
        raise InputError(f"{where}.reject: expected true, got {v!r}; remove the line to keep the cluster")
    return Entry(reject=True)


def check_name(name: object, where: str) -> str:
    """``name`` if it can name a class (and its export folder): a non-empty string without
    ``/``, ``\\``, surrounding spaces or a reserved word; else an ``InputError``."""
    if not isinstance(name, str) or not path_component(name) or name != name.strip() or not name.isprintable():
        raise InputError(f"{where}: {name!r} cannot name a class; use a non-empty name without '/', '\\' or surrounding spaces")
    if name.casefold() in (r.casefold() for r in RESERVED):
        raise InputError(f"{where}: {name!r} is reserved; to mark a cluster as not a defect use {{reject: true}}")
    return name


def check(cat: Catalog) -> None:
    """``InputError`` for a merge into itself or a cycle, and a name given to two clusters."""
    for k, e in cat.entries.items():
        if e.same_as is not None:
            _root(cat, k)
    seen: dict[str, int] = {}
    for k, e in cat.entries.items():
        if e.name:
            key = e.name.casefold()
            if key in seen:
                raise InputError(
                    f"{cat.where}: {k}.name: {e.name!r} is also the name of cluster {seen[key]}; merge them "
                    f"({k}: {{same_as: {seen[key]}}}) or choose another name"
                )
            seen[key] = k


def _root(cat: Catalog, k: int) -> int:
    path = [k]
    while (nxt := cat.entries.get(path[-1], Entry()).same_as) is not None:
        if nxt in path:
            chain = " -> ".join(map(str, path + [nxt]))
            what = "merged into itself" if len(path) == 1 else f"merge cycle {chain}"
            raise InputError(f"{cat.where}: {path[-1]}.same_as: {what}; remove one of these same_as lines")
        path.append(nxt)
    return path[-1]


def check_clusters(cat: Catalog, n_clusters: int) -> None:
    """``InputError`` for a cluster id (key or ``same_as``) outside the run's ``0..n_clusters-1``."""
    for k, e in cat.entries.items():
        for where, c in ((f"{k}", k), (f"{k}.same_as", e.same_as)):
            if c is not None and not 0 <= c < n_clusters:
                raise InputError(
                    f"{cat.where}: {where}: cluster {c} does not exist (the run has clusters 0..{n_clusters - 1}); "
                    "fix or remove the line"
                )


# -- resolving -------------------------------------------------------------------------------


def default_name(cluster: int, matched: Mapping[int, str]) -> str:
    """An uncurated cluster's name: its matched true type, else ``cluster <id>``."""
    return matched.get(cluster) or f"cluster {cluster}"


def resolve(cat: Catalog, n_clusters: int, matched: Mapping[int, str] | None = None) -> list[CuratedClass]:
    """The curated class of each cluster ``0..n_clusters-1`` (``matched``: cluster -> matched
    true type, for the default names). A name a curated class takes that another has by default
    is an ``InputError``, as are clusters the run does not have."""
    matched = dict(matched or {})
    check_clusters(cat, n_clusters)
    roots = {k: _root(cat, k) for k in range(n_clusters)}
    rejected = {k: cat.entries.get(roots[k], Entry()).reject for k in roots}
    name_of = {r: cat.entries.get(r, Entry()).name or default_name(r, matched) for r in set(roots.values())}
    owner: dict[str, int] = {}
    for r in sorted(name_of):
        if rejected[r]:
            continue
        key = name_of[r].casefold()
        if key in owner:
            a, b = sorted((owner[key], r), key=lambda c: c not in cat.entries)  # the one the user named first
            raise InputError(
                f"{cat.where}: {a}.name: {name_of[a]!r} is the name cluster {b} has by its matched true type; merge "
                f"them ({b}: {{same_as: {a}}}) or name cluster {b} too"
            )
        owner[key] = r
    return [
        CuratedClass(k, roots[k], REJECTED if rejected[k] else name_of[roots[k]], rejected[k], matched.get(k))
        for k in range(n_clusters)
    ]


def curated_labels(classes: Sequence[CuratedClass], labels: np.ndarray) -> np.ndarray:
    """Cluster ids (n,) -> curated labels (n,): each cluster's :attr:`CuratedClass.label`;
    other ids (-1: no anomaly found) are kept."""
    labels = np.asarray(labels, np.int64)
    table = {c.cluster: c.label for c in classes}
    return np.array([table.get(int(k), int(k)) for k in labels.tolist()], np.int64).reshape(labels.shape)


def class_names(classes: Sequence[CuratedClass]) -> dict[int, str]:
    """Curated label -> name (the roots, and :data:`REJECTED_ID` where a cluster is rejected)."""
    out = {c.label: c.name for c in classes}
    return dict(sorted(out.items()))


def cluster_names(classes: Sequence[CuratedClass]) -> dict[int, str]:
    """Cluster id -> the name of its curated class."""
    return {c.cluster: c.name for c in classes}


def to_attrs(classes: Sequence[CuratedClass]) -> list[dict]:
    """The resolved catalog as JSON-ready rows (stored with the merge result)."""
    return [{"cluster": c.cluster, "class": c.root, "name": c.name, "rejected": c.rejected, "matched": c.matched} for c in classes]


def from_attrs(rows: object, where: str) -> list[CuratedClass]:
    """:func:`to_attrs` rows back to :class:`CuratedClass` (``InputError`` if damaged)."""
    try:
        return [CuratedClass(int(r["cluster"]), int(r["class"]), str(r["name"]), bool(r["rejected"]), r.get("matched")) for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where}: damaged class catalog ({e}); rerun merge (dvc repro)") from e


# -- I/O -------------------------------------------------------------------------------------


def load_catalog(path: str | os.PathLike = CATALOG_FILE) -> Catalog:
    """The catalog in ``path``; an empty one (no curation) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return Catalog(where=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({e}); fix or remove the file") from e
    return parse_catalog(text, str(path))


def dump_catalog(cat: Catalog) -> str:
    """The YAML text of ``cat``: :data:`HEADER`, then one ``<cluster>: {...}`` line per entry."""
    lines = [f"{k}: {yaml.safe_dump(e.as_dict(), default_flow_style=True, width=10_000).strip()}" for k, e in cat.entries.items()]
    return HEADER + "".join(line + "\n" for line in lines)


def save_catalog(cat: Catalog, path: str | os.PathLike = CATALOG_FILE) -> None:
    """Write ``cat`` to ``path`` atomically (comments other than the header are not kept)."""
    text = dump_catalog(cat)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
