"""Where twin writes: the one policy for every ``--out`` (issue 11, item 1).

Twin never deletes what the user had. An output is written into a fresh sibling temporary
(directory or file) and renamed into place at the end, so a failed or interrupted run
leaves the destination as it was and no temporary behind. An existing destination is
replaced only when it is a previous twin output of the same *kind*:

- a directory holding the marker file ``.twin-output`` (JSON: kind, twin version, and the
  paths twin wrote there); one holding anything else besides (a user's notes, a nested
  output) is refused, since replacing the folder would delete it;
- a Parquet file whose key-value metadata has ``twin_output`` = kind;
- a JSON file whose ``twin_output`` field is the kind, or whose ``schema`` is
  ``twin.<kind>/<version>`` (profiles, recommender models);
- an empty directory (nothing to lose).

Anything else is refused before the run starts, as are ``""``, ``.``, ``..``, ``/``, the
home directory, the working directory and their ancestors, an input or an ancestor of an
input, and a destination whose parent cannot be written. While a command runs, it holds an
exclusive ``flock`` on ``.<name>.twin-lock`` beside the destination, so a second command
writing the same ``--out`` stops at once with a clear error; the lock dies with its
process, so a killed run leaves nothing stale to clear by hand.

Stores that grow in place (``twin sweep``'s resumable dataset, ``twin train``'s
workspace) use :func:`open_store`: same checks and lock, no rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

from twin.errors import TwinInputError

MARKER = ".twin-output"
META_KEY = "twin_output"
LOCK_SUFFIX = ".twin-lock"

# lock files this process holds: path -> [fd, depth, folders made] (re-entrant: the CLI takes the lock
# before the run, the library's save takes it again when it writes)
_HELD: dict[str, list] = {}


# -- what is at a path -----------------------------------------------------------------------

def output_kind(path: str | Path) -> str | None:
    """The kind of twin output at ``path`` (directory marker, Parquet metadata or JSON
    field), or None when twin cannot tell that it wrote it."""
    p = Path(path)
    try:
        if p.is_dir():
            if not (p / MARKER).is_file():
                return None
            return str(json.loads((p / MARKER).read_text()).get("kind")) or None
        suffix = p.suffix.lower()
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq   # lazy: +5 MB RSS, only for a Parquet output

            meta = pq.read_schema(p).metadata or {}
            kind = meta.get(META_KEY.encode())
            return kind.decode() if kind else None
        if suffix == ".json":
            d = json.loads(p.read_text())
            if not isinstance(d, dict):
                return None
            if d.get(META_KEY):
                return str(d[META_KEY])
            schema = str(d.get("schema", ""))
            if schema.startswith("twin.") and "/" in schema:
                return schema[len("twin."):].split("/")[0]
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    except Exception:   # pyarrow: not a Parquet file
        return None
    return None


def input_paths(args, skip=("out",)) -> list[Path]:
    """Every path a command's arguments name (Path values, and strings naming an existing
    file, e.g. ``--profile my.json``): what ``--out`` must never replace."""
    found = []
    for name, value in vars(args).items():
        if name in skip or name == "func":
            continue
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, Path) or (isinstance(v, str) and v and os.path.exists(v)):
                found.append(Path(v))
    return found


def _resolved(p: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()


def _is_ancestor_or_same(a: Path, b: Path) -> bool:
    return a == b or a in b.parents


def check_out(path, kind: str, *, inputs=(), file: bool = False, field: str = "--out") -> Path:
    """Refuse a destination twin must not write (see the module doc); return it resolved.

    Called before a command's work, so a bad ``--out`` costs nothing."""
    raw = "" if path is None else str(path)
    if raw.strip() in ("", ".", "..", "/", "~") or Path(raw).name in ("", ".", ".."):
        raise TwinInputError(f"refusing to write into {raw!r}: give a new directory or file "
                             "name (twin replaces only its own previous outputs)", field=field)
    dest = _resolved(Path(raw))
    protected = [(Path("/"), "the root directory"), (_resolved(Path.home()), "your home "
                 "directory"), (_resolved(Path.cwd()), "the working directory")]
    for p, what in protected:
        if _is_ancestor_or_same(dest, p):
            raise TwinInputError(f"refusing to write into {what} or one of its parents",
                                 file=raw, field=field)
    for inp in inputs or ():
        if inp is None or str(inp) == "":
            continue
        if _is_ancestor_or_same(dest, _resolved(Path(inp))):
            raise TwinInputError(f"is (or contains) the input {inp}; twin never writes over "
                                 "its inputs: choose another path", file=raw, field=field)
    if dest.exists() or dest.is_symlink():
        if file and dest.is_dir():
            raise TwinInputError("is a directory; expected a file name", file=raw, field=field)
        if not file and not dest.is_dir():
            raise TwinInputError("exists and is a file; expected a directory", file=raw,
                                 field=field)
        if not (dest.is_dir() and not any(dest.iterdir())):
            have = output_kind(dest)
            if have is None:
                raise TwinInputError(
                    "exists and is not a twin output; twin never replaces files it did not "
                    "write: choose a new path or remove it yourself", file=raw, field=field)
            if have != kind:
                raise TwinInputError(f"holds a twin {have!r} output, not {kind!r}; choose "
                                     "another path", file=raw, field=field)
            foreign = foreign_entries(dest)
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                                  if len(foreign) > 3 else "")
                raise TwinInputError(
                    f"is a twin {kind!r} output that also holds what twin did not write there "
                    f"({shown}); replacing it would delete them: move them out or choose "
                    "another path", file=raw, field=field)
    anc = dest.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise TwinInputError(f"cannot be created: {anc} is not a directory", file=raw,
                             field=field)
    if not os.access(anc, os.W_OK | os.X_OK):
        raise TwinInputError(f"cannot be written: {anc} is not writable", file=raw, field=field)
    return dest


# -- the lock ---------------------------------------------------------------------------------

def _lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{LOCK_SUFFIX}")


def _acquire(dest: Path) -> str:
    lock = _lock_path(dest)
    key = str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    created = [a for a in [lock.parent, *lock.parent.parents] if not a.exists()]
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TwinInputError(f"cannot create its folder: {exc.strerror}", file=str(dest),
                             field="--out") from None
    while True:
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TwinInputError(f"cannot be written: {exc.strerror}", file=str(dest),
                                 field="--out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TwinInputError("another twin command is writing it right now; wait for it "
                                 "to finish or choose another --out", file=str(dest),
                                 field="--out") from None
        try:   # the holder before us may have unlinked the file we opened: retry
            same = os.stat(key).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1, created]
    return key


def _release(key: str) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    with contextlib.suppress(OSError):
        os.unlink(key)
    os.close(held[0])
    for d in held[2]:   # folders made for an output that never came: removed if empty
        try:
            d.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def prepare(path, kind: str, *, inputs=(), file: bool = False):
    """Check ``--out`` and hold its lock for the run (``with prepare(args.out, ...)``);
    yields the resolved destination, or None when ``path`` is None (no output asked)."""
    if path is None:
        yield None
        return
    dest = check_out(path, kind, inputs=inputs, file=file)
    key = _acquire(dest)
    try:
        yield dest
    finally:
        _release(key)


# -- writing ----------------------------------------------------------------------------------

def _clear_stale(dest: Path, pattern: str) -> None:
    """Remove temporaries of ``dest`` a killed run left (we hold the lock: none is live)."""
    for p in dest.parent.glob(pattern):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _entries(directory: Path) -> list[str]:
    """Every path below ``directory`` (files, links and folders; symlinked folders not
    followed), relative, '/'-separated, the marker left out."""
    found = []
    for root, dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        found += [(rel / n).as_posix() for n in dirs + files]
    return sorted(e for e in found if e != MARKER)


def write_marker(directory: Path, kind: str, *, listing: bool = False) -> None:
    """Mark ``directory`` as a twin ``kind`` output; ``listing``: also record every path in
    it, so that a later run replaces it only while it holds nothing else
    (:func:`foreign_entries`). Stores that grow in place are never replaced: no listing."""
    doc = {"kind": kind, "twin_version": __import__("twin").__version__}
    if listing:
        doc["files"] = _entries(Path(directory))
    (Path(directory) / MARKER).write_text(json.dumps(doc) + "\n")


def foreign_entries(directory: Path) -> list[str]:
    """The paths in a marked twin output folder that twin did not write there (empty when
    its marker predates the listing: nothing to compare with)."""
    try:
        listed = json.loads((Path(directory) / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(listed, list):
        return []
    return sorted(set(_entries(Path(directory))) - set(map(str, listed)))


@contextlib.contextmanager
def staged_dir(path, kind: str, *, inputs=()):
    """Yield a fresh temporary directory beside ``path``; on success mark it as a twin
    ``kind`` output and rename it into place (replacing a previous one of that kind), on
    any error (KeyboardInterrupt included) remove it and leave ``path`` as it was."""
    with prepare(path, kind, inputs=inputs) as dest:
        # tempfile's 8 random characters, so that "run.x"'s temporaries are not "run"'s
        _clear_stale(dest, f".{glob.escape(dest.name)}.{'?' * 8}.tmp")
        _clear_stale(dest, f".{glob.escape(dest.name)}.{'?' * 8}.old.tmp")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp's 0700 is for temporaries, not results
        old = None
        try:
            yield tmp
            write_marker(tmp, kind, listing=True)
            check_out(dest, kind, inputs=inputs)   # still ours (or absent) at swap time
            if dest.exists():
                old = dest.with_name(tmp.name[:-len(".tmp")] + ".old.tmp")
                dest.rename(old)
            try:
                tmp.rename(dest)
            except BaseException:
                if old is not None:
                    old.rename(dest)
                    old = None
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path, kind: str, *, inputs=()):
    """Yield a temporary file name beside ``path`` (same suffix); on success ``os.replace``
    it onto ``path``. The writer must mark the file as a twin ``kind`` output (Parquet
    metadata / JSON field) for a later run to replace it."""
    with prepare(path, kind, inputs=inputs, file=True) as dest:
        _clear_stale(dest, f".{glob.escape(dest.stem)}.{'?' * 8}.tmp{glob.escape(dest.suffix)}")
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}",
                                    dir=dest.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())  # as a plain open() would create it, not 0600
        tmp = Path(name)
        try:
            yield tmp
            check_out(dest, kind, inputs=inputs, file=True)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


@contextlib.contextmanager
def open_store(path, kind: str, *, inputs=()):
    """A directory that grows in place (resumable sweeps, training workspaces): checked
    and locked like any output, created and marked, never renamed or emptied."""
    with prepare(path, kind, inputs=inputs) as dest:
        dest.mkdir(parents=True, exist_ok=True)
        if not (dest / MARKER).exists():
            write_marker(dest, kind)
        yield dest


def write_parquet(df, path, kind: str, metadata: dict[str, str] | None = None) -> None:
    """``df`` as Parquet at ``path`` (a temp file of :func:`staged_file`) carrying
    ``twin_output = kind`` and ``metadata`` (str -> str) in its key-value metadata (pandas
    readers ignore it)."""
    import pyarrow.parquet as pq   # lazy: +5 MB RSS, only for a Parquet output

    table = pa.Table.from_pandas(df, preserve_index=False)
    extra = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra,
                                           META_KEY.encode(): kind.encode()})
    pq.write_table(table, path)


def console(json_mode: bool):
    """``print`` for a command's chatter: stderr when ``--json`` owns stdout (item 9: stdout
    carries exactly one JSON document)."""
    if not json_mode:
        return print

    def say(*a, **k):
        k["file"] = sys.stderr
        print(*a, **k)
    return say


def plain(obj):
    """``obj`` as JSON's values: numpy scalars and arrays as Python numbers and lists, and a
    NaN or infinite float as None (RFC 8259 has no NaN)."""
    if isinstance(obj, float):   # np.float64 too
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    item = getattr(obj, "item", None)   # numpy scalars and 0-d arrays
    if callable(item) and getattr(obj, "ndim", None) == 0:
        return plain(item())
    tolist = getattr(obj, "tolist", None)   # numpy arrays
    if callable(tolist):
        return plain(tolist())
    return obj


def json_document(obj, **kw) -> str:
    """``obj`` as standard JSON, for every JSON file twin writes for its users
    (``summary.json``, ``validation.json``) and ``--json`` stdout: NaN/inf (a metric with no
    sample, e.g. TTFT when nothing finished) become null, numpy numbers plain ones.
    Python's default ``NaN`` token makes JavaScript, Go and Rust parsers (``jq``)
    reject the whole document. ``kw``: ``json.dumps``'s (``indent``, ``default`` for
    other objects)."""
    return json.dumps(plain(obj), allow_nan=False, **kw)
