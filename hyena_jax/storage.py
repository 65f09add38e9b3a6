"""Where a run's files live: a local folder or an object store (gs://), behind one path type.

Every path the tools write or read (workdir, checkpoints, metrics, final metrics, curves,
TensorBoard, exports, `--model` sources) goes through `resolve`, which returns an
`etils.epath.Path`: the path type orbax itself uses, so checkpoints, run files and Grain's
iterator state all name the same place. Local paths are made absolute (orbax refuses relative
ones, at the first save); URLs are kept as they are. gs:// is served by gcsfs (the `gcs` extra)
through epath and by tensorstore for orbax's arrays.

Object stores have no rename: an object appears whole when its upload is finalised, or not at
all. `write_atomically` therefore writes local files to a temporary file and renames it, and
objects with a single upload; readers and a kill at any moment see the old content or the new.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Union

from etils import epath

from hyena_jax.errors import InputError, MissingDependencyError, MissingInputError

try:
  import fsspec.config  # pylint: disable=g-import-not-at-top

  # gcsfs caches folder listings forever by default; processes of a multi-host run (and orbax's
  # `reload`) must see steps other processes wrote or moved, so listings are always fresh.
  for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)
except ImportError:  # no fsspec: no gs:// either (check_access says what to install)
  pass

PathLike = Union[str, os.PathLike]
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
SUPPORTED_SCHEMES = ("gs",)
GCS_EXTRA = "pip install -e '.[gcs]'"


def scheme(path: PathLike) -> str | None:
  """'gs' for gs://bucket/x; None for a local path."""
  match = _URL.match(os.fspath(path))
  return match.group(1).lower() if match else None


def is_url(path: PathLike) -> bool:
  return scheme(path) is not None


def resolve(path: PathLike) -> epath.Path:
  """The path as an epath.Path: local paths absolute (with ~ expanded), URLs unchanged."""
  text = os.fspath(path)
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def display(path: PathLike) -> str:
  """How messages name a path: URLs as given, local paths absolute."""
  return os.fspath(resolve(path))


def check_access(path: PathLike, what: str = "path") -> None:
  """Fails with one clear error unless `path` is local or in a bucket these credentials reach.

  Checked before any work is done (an unreachable workdir would otherwise surface as a traceback
  at the first checkpoint save, minutes into training); nothing is created by the check. The
  probe lists at most one object under the path: that needs only object permissions (a service
  account with objectAdmin may not read the bucket's own metadata), and it is made once, with a
  timeout and no retries, so that a network that does not answer is reported in seconds, not
  after a minute of gcsfs's backoff.
  """
  kind = scheme(path)
  if kind is None:
    return
  text = os.fspath(path)
  if kind not in SUPPORTED_SCHEMES:
    raise InputError(f"{what} {text}: {kind}:// is not supported; use a local path or a gs:// URL")
  try:
    import gcsfs  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.auth import exceptions as auth_exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError(
        f"{what} {text} is on Google Cloud Storage, which needs the gcs extra (gcsfs, "
        f"google-cloud-storage): {GCS_EXTRA}") from e
  bucket, _, prefix = _URL.sub("", text).partition("/")
  if not bucket:
    raise InputError(f"{what} {text} names no bucket: use gs://BUCKET/path")
  check = ("check the credentials (gcloud auth application-default login, or "
           "GOOGLE_APPLICATION_CREDENTIALS) and the network")
  try:
    list(gcs.Client().list_blobs(bucket, prefix=prefix, max_results=1, timeout=30, retry=None))
  except exceptions.NotFound as e:
    raise MissingInputError(
        f"bucket gs://{bucket} for {what} {text} does not exist; create it (gcloud storage "
        f"buckets create gs://{bucket}) or check the name") from e
  except exceptions.Forbidden as e:
    raise InputError(f"the credentials in use may not list objects in gs://{bucket} ({what} "
                     f"{text}): grant them storage.objects.list/create/get/delete on the bucket "
                     f"(roles/storage.objectAdmin), or {check}") from e
  except OSError as e:  # requests' ConnectionError and timeouts
    api = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
    raise InputError(f"cannot reach bucket gs://{bucket} for {what} {text} ({type(e).__name__}: "
                     f"no answer from the storage API at {api}); {check}") from e
  except (exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as e:
    raise InputError(f"cannot reach bucket gs://{bucket} for {what} {text} "
                     f"({type(e).__name__}: {str(e)[:200]}); {check}") from e


def makedirs(path: PathLike) -> epath.Path:
  """Creates a local folder (and its parents); on an object store folders are implicit, so
  nothing is created (gcsfs would create a missing *bucket*, which a run must never do)."""
  path = resolve(path)
  if not is_url(path):
    path.mkdir(parents=True, exist_ok=True)
  return path


def write_atomically(path: PathLike, data: str | bytes) -> None:
  """Writes `data` so that no reader or kill ever sees a partial file (see the module doc)."""
  path = resolve(path)
  payload = data.encode() if isinstance(data, str) else data
  if is_url(path):
    path.write_bytes(payload)  # one upload: the object is replaced whole when it is finalised
    return
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_npy(path: PathLike, array) -> None:
  """np.save to a local file or an object, written atomically."""
  import io  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array))
  write_atomically(path, buffer.getvalue())


def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or folder (a folder on an object store is copied object by object, then the
  originals deleted: no reader sees it half moved as a checkpoint, since orbax ignores the
  destination folder)."""
  src, dst = resolve(src), resolve(dst)
  if is_url(src):
    import fsspec  # pylint: disable=g-import-not-at-top  (gcsfs's base; check_access ran first)
    fs, _ = fsspec.core.url_to_fs(os.fspath(src))
    fs.mv(os.fspath(src), os.fspath(dst), recursive=True)
    return
  dst.parent.mkdir(parents=True, exist_ok=True)
  os.replace(src, dst)


def require_local(path: PathLike, what: str, why: str, *, output: bool = False) -> str:
  """The local path as a string; a URL is refused, saying why a local file is needed."""
  if is_url(path):
    text = os.fspath(path)
    fix = (f"write it to a local file, then copy it (gcloud storage cp FILE {text})" if output
           else f"copy it to a local disk first (gcloud storage cp {text} .)")
    raise InputError(f"{what} {text} is a URL, but {why}: {fix}")
  return os.fspath(path)


def check_writable(path: str | os.PathLike, what: str) -> None:
  """Refuses, before any work, a local output whose folder exists but cannot take a new file
  (read-only, /proc, ...). A real file is created and removed: os.access says yes to root and
  to /proc. URLs and missing folders are left to the writer (it creates or names them)."""
  if is_url(path):
    return
  parent = os.path.dirname(os.path.abspath(os.fspath(path)))
  if not os.path.isdir(parent):
    return
  try:
    with tempfile.NamedTemporaryFile(dir=parent, prefix=".hyena_jax-write-check-"):
      pass
  except OSError as e:
    raise InputError(f"{what} {os.fspath(path)}: cannot write in {parent} ({e.strerror or e}); "
                     "choose a folder you can write to") from None
