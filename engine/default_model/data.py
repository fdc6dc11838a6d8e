"""The training text: the Python standard library source of the running interpreter (PSF licence).

Every `*.py` file under `sysconfig.get_paths()["stdlib"]`, except site-packages, test suites and
generated files, deduplicated by content. Files are split by module into train and a FIXED
held-out list (HELD_OUT); nothing depends on file-system order: paths are sorted, and of files
with identical content the first path in sorted order is kept (a held-out file always wins, so
its text never reaches training).

Files are read as UTF-8 exactly as stored; a file that is not valid UTF-8 is skipped and counted.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Held-out modules, chosen once and never changed (changing them invalidates every reported
# figure). Plain, stable library code present in CPython 3.10 to 3.13, 3-30 KB each, spread
# over text processing, data structures, concurrency, parsing and e-mail/web helpers.
HELD_OUT: tuple[str, ...] = (
    "asyncio/locks.py",
    "asyncio/queues.py",
    "base64.py",
    "bisect.py",
    "colorsys.py",
    "concurrent/futures/thread.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "email/base64mime.py",
    "email/quoprimime.py",
    "fnmatch.py",
    "getopt.py",
    "graphlib.py",
    "heapq.py",
    "html/parser.py",
    "http/cookies.py",
    "json/decoder.py",
    "json/encoder.py",
    "mimetypes.py",
    "netrc.py",
    "numbers.py",
    "operator.py",
    "pprint.py",
    "queue.py",
    "reprlib.py",
    "sched.py",
    "shlex.py",
    "string.py",
    "textwrap.py",
    "weakref.py",
    "wsgiref/headers.py",
)

# A few small held-out files for quick checks (the shipped-model test): about 25 KB together.
QUICK_HELD_OUT: tuple[str, ...] = ("bisect.py", "colorsys.py", "email/base64mime.py", "reprlib.py", "fnmatch.py")

TEST_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})
GENERATED_NAMES = ("pydoc_data/topics.py",)  # the whole HTML docs as one string
GENERATED_PREFIXES = ("_sysconfigdata",)  # build settings of this interpreter
MAX_FILE_BYTES = 256 * 1024  # anything larger is data, not code (topics.py is 750 KB)


@dataclass
class Corpus:
    """Texts in sorted path order, with what was left out and why."""

    root: Path
    train: dict[str, str] = field(default_factory=dict)  # relative path -> text
    held_out: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> relative paths

    def train_texts(self) -> list[str]:
        return list(self.train.values())

    def held_out_texts(self) -> list[str]:
        return list(self.held_out.values())

    def byte_counts(self) -> dict[str, int]:
        return {"train_bytes": _utf8_bytes(self.train.values()), "held_out_bytes": _utf8_bytes(self.held_out.values()),
                "train_files": len(self.train), "held_out_files": len(self.held_out)}

    def fingerprint(self) -> str:
        """sha256 over every (path, text) of both splits: equal fingerprints, equal data."""
        digest = hashlib.sha256()
        for split in (self.train, self.held_out):
            for path, text in split.items():
                digest.update(path.encode() + b"\0" + text.encode() + b"\0")
        return digest.hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _utf8_bytes(texts) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def _reason_to_skip(rel: str, raw: bytes) -> str | None:
    parts = rel.split("/")
    if parts[0].startswith("config-"):
        return "build configuration"
    if rel in GENERATED_NAMES or parts[-1].startswith(GENERATED_PREFIXES) or b"with gencodec.py" in raw[:400]:
        return "generated"
    if len(raw) > MAX_FILE_BYTES:
        return "too large"
    return None


def _python_files(root: Path) -> list[str]:
    """Relative posix paths of every *.py file under root, sorted; test and site-packages
    folders are not even walked (site-packages alone can hold tens of thousands of files)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in TEST_DIRS]
        rel_folder = Path(folder).relative_to(root)
        found += [(rel_folder / name).as_posix() for name in files if name.endswith(".py")]
    return sorted(found)


def load_corpus(root: Path | None = None) -> Corpus:
    """Read, filter, deduplicate and split the standard library under `root` (default: this
    interpreter's). Raises ValueError if a held-out file is missing, so a split is never silently
    different from the documented one."""
    root = Path(root) if root is not None else stdlib_root()
    corpus = Corpus(root)
    texts: dict[str, str] = {}
    for rel in _python_files(root):
        raw = (root / rel).read_bytes()
        reason = _reason_to_skip(rel, raw)
        if reason is None:
            try:
                texts[rel] = raw.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not UTF-8"
        if reason is not None:
            corpus.skipped.setdefault(reason, []).append(rel)

    missing = [rel for rel in HELD_OUT if rel not in texts]
    if missing:
        raise ValueError(f"held-out file(s) missing from {root}: {', '.join(missing)}")
    seen = set()
    for rel in HELD_OUT:  # held-out first, so its content claims the hash
        seen.add(hashlib.sha256(texts[rel].encode()).digest())
    for rel in sorted(HELD_OUT):
        corpus.held_out[rel] = texts[rel]
    for rel, text in texts.items():
        if rel in corpus.held_out:
            continue
        key = hashlib.sha256(text.encode()).digest()
        if key in seen:
            corpus.skipped.setdefault("duplicate", []).append(rel)
            continue
        seen.add(key)
        corpus.train[rel] = text
    return corpus


def main() -> None:
    corpus = load_corpus()
    counts = corpus.byte_counts()
    print(f"stdlib at {corpus.root}")
    for name, value in counts.items():
        print(f"{name}: {value:,}")
    for reason, paths in sorted(corpus.skipped.items()):
        print(f"skipped ({reason}): {len(paths)} files")
    print(f"fingerprint: {corpus.fingerprint()}")


if __name__ == "__main__":
    main()
