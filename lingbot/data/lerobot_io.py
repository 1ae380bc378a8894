"""Reading LeRobot v3 datasets: where they come from, whether they are whole, and their tables.

A source is a local directory or a Hub dataset `org/name@revision`. Hub sources go through
`huggingface_hub.snapshot_download` (so they are cached, revision-pinned, and work offline with
HF_HUB_OFFLINE=1 once cached); everything after that reads the local root: meta/, then the parquet
and video files it declares.

Every check here fails with a `LingbotError` naming the file (and episode or column) at fault, before
a library deeper down can fail with a traceback.

What LeRobot (0.6.1) does and what this module does itself. Datasets are written by `LeRobotDataset.create`
(collect) and downloaded with `snapshot_download`, as LeRobot does (here into the standard Hub cache, at
the revision asked for, and only the files of the chosen episodes). The reading stays here, on pyarrow and
PyAV, because LeRobot's readers do not fit; tests/test_lerobot_io.py checks that both read the same:
- `read_meta`, not `LeRobotDatasetMetadata`: the tables are the same, column for column, but importing it
  imports torch, `datasets` and all of `lerobot.datasets`, into stages that need none of them (`lingbot
  validate` on the tiny dataset, 2 CPU cores: 5.5 s -> 12.8 s). It also copies meta/episodes into the
  `datasets` Arrow cache, takes a missing file as a cue to download meta/ from the Hub, and its
  `DatasetInfo` drops fields it does not know, where `ingest.write_subset` rewrites info.json as read.
- `read_frames`, not `LeRobotDataset(episodes=...)`: it cannot open what ingest writes from a subset of
  episodes or cameras (it finds episodes or videos missing and goes to the Hub for them).
- `iter_episode_frames`, not `decode_video_frames`: the pixels are the same (bit for bit, with its pyav and
  torchcodec backends, on collect's H.264 4:4:4 and LeRobot's default AV1 4:2:0), but it returns the frame
  nearest each timestamp asked for, so it cannot count the frames a segment holds (validate checks that
  count), and it opens and seeks once per episode: 1.4-3x slower than one pass over each file.
The train-split statistics (`ingest`), the subset copy (`ingest.write_subset`), the content fingerprint and
the episode spec have no LeRobot counterpart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lingbot.errors import LingbotError
from lingbot.fsutil import read_json

SUPPORTED_VERSION = "v3.0"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Source:
    """Where a dataset came from, recorded with everything derived from it."""

    spec: str  # as given: a path, or org/name@revision
    root: Path  # local directory holding meta/, data/, videos/
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None  # resolved Hub commit for a Hub source


def parse_episodes(spec: str) -> list[int] | None:
    """`ingest.episodes`: LeRobot episode indices and inclusive ranges, "0-99,120,130-139"; "" = all."""
    spec = str(spec).strip()
    if not spec:
        return None
    chosen: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise LingbotError(f"ingest.episodes: {part.strip()!r} is not an episode index or a range a-b (a <= b)")
        chosen.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(chosen)


def resolve_source(spec: str, cameras: tuple[str, ...] = (), episodes: list[int] | None = None) -> Source:
    """Turn a source spec into a local dataset root (downloading a Hub snapshot if needed).

    From the Hub only what the chain reads comes down: meta/, then the data and video files of the
    chosen `episodes` (all when None) and `cameras` (all when empty). v3 packs many episodes into one
    file, so a few hundred episodes of a corpus of thousands cost the disk of the files holding them."""
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        if not path.is_dir():
            raise LingbotError(f"{spec}: no such dataset directory")
        return Source(spec=spec, root=path.resolve())
    repo_id, _, revision = spec.partition("@")
    revision = revision or "main"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def download(patterns: list[str] | None) -> Path:
        try:
            return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns))
        except LocalEntryNotFoundError:
            raise LingbotError(
                f"{spec}: not in the local Hugging Face cache and the Hub cannot be reached "
                "(download it once with network, or pass a local dataset directory)"
            ) from None
        except HfHubHTTPError as exc:
            raise LingbotError(f"{spec}: Hub refused the download ({str(exc).splitlines()[0]})") from None

    if episodes is None:
        root = download(None if not cameras else ["meta/**", "data/**", *(f"videos/{key}/**" for key in cameras)])
    else:
        meta = read_meta(download(["meta/**"]))
        chosen = meta.restricted(episodes)
        root = download(["meta/**", *chosen.files(list(cameras) or chosen.video_keys)])
    commit = root.name if re.fullmatch(r"[0-9a-f]{40}", root.name) else None
    return Source(spec=spec, root=root, repo_id=repo_id, revision=revision, commit=commit)


@dataclass
class DatasetLayout:
    """The checked shape of a LeRobot v3 dataset on disk."""

    root: Path
    info: dict
    episodes: "object"  # pandas.DataFrame of meta/episodes (one row per episode)
    tasks: dict[int, str]  # task_index -> task string
    data_files: list[Path] = field(default_factory=list)
    selected: bool = False  # a subset of the listed episodes (see `restricted`)

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    @property
    def features(self) -> dict:
        return self.info["features"]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    def video_path(self, episode: dict, key: str) -> Path:
        rel = self.info["video_path"].format(
            video_key=key,
            chunk_index=int(episode[f"videos/{key}/chunk_index"]),
            file_index=int(episode[f"videos/{key}/file_index"]),
        )
        return self.root / rel

    def data_path(self, episode: dict) -> Path:
        rel = self.info["data_path"].format(
            chunk_index=int(episode["data/chunk_index"]), file_index=int(episode["data/file_index"])
        )
        return self.root / rel

    def restricted(self, episodes: list[int]) -> "DatasetLayout":
        """This dataset seen through `episodes` only: their rows of meta/episodes and the data files
        holding them. Those files may hold other episodes too; `read_frames` leaves their rows out."""
        listed = set(int(e) for e in self.episodes["episode_index"])
        missing = [e for e in episodes if e not in listed]
        if missing:
            raise LingbotError(f"{self.root / 'meta' / 'episodes'}: episode {missing[0]} not in the dataset "
                               f"(it has {len(listed)} episodes, {min(listed)}..{max(listed)})")
        return self.over(self.episodes[self.episodes["episode_index"].isin(episodes)].reset_index(drop=True),
                         selected=True)

    def over(self, rows, selected: bool = False) -> "DatasetLayout":
        """This layout with episode table `rows` and the data files (in episode order) that hold them."""
        data_files = list(dict.fromkeys(self.data_path(ep) for ep in rows.to_dict("records")))
        return dataclasses.replace(self, episodes=rows, data_files=data_files, selected=selected)

    def files(self, cameras: list[str]) -> list[str]:
        """Relative paths of the data files and of `cameras`' video files that hold this layout's episodes."""
        rows = self.episodes.to_dict("records")
        paths = [self.data_path(ep) for ep in rows] + [self.video_path(ep, key) for key in cameras for ep in rows]
        return [str(p.relative_to(self.root)) for p in dict.fromkeys(paths)]


def _read_parquet(path: Path, columns: list[str] | None = None, schema_only: bool = False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path) if schema_only else pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise LingbotError(f"{path}: parquet file missing") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise LingbotError(f"{path}: unreadable or truncated parquet ({str(exc).splitlines()[0]})") from None


def read_meta(root: Path) -> DatasetLayout:
    """Check a LeRobot v3 dataset's metadata (meta/ only) and read its episode and task tables."""
    root = Path(root)
    info_path = root / "meta" / "info.json"
    info = read_json(info_path, f"missing; {root} is not a LeRobot dataset")
    version = info.get("codebase_version")
    if version != SUPPORTED_VERSION:
        hint = " (convert it with lerobot's convert_dataset_v21_to_v30)" if str(version).startswith("v2") else ""
        raise LingbotError(
            f"{info_path}: LeRobot dataset version {version!r}, lingbot reads {SUPPORTED_VERSION}{hint}"
        )
    for key in ("fps", "features", "data_path", "total_episodes", "total_frames"):
        if key not in info:
            raise LingbotError(f"{info_path}: field {key!r} missing")
    if int(info["total_episodes"]) == 0 or int(info["total_frames"]) == 0:
        raise LingbotError(f"{root}: dataset is empty (0 episodes)")

    episode_files = episode_meta_files(root)
    if not episode_files:
        raise LingbotError(f"{root / 'meta' / 'episodes'}: no episode metadata parquet files")
    import pyarrow as pa

    # Per-episode stats are left out, as LeRobot's `load_episodes` does: nothing reads them here, and in a
    # large dataset they are most of the table.
    episodes = pa.concat_tables([
        _read_parquet(p, [n for n in _read_parquet(p, schema_only=True).names if not n.startswith("stats/")])
        for p in episode_files
    ]).to_pandas()
    episodes = episodes.sort_values("episode_index").reset_index(drop=True)
    if len(episodes) != int(info["total_episodes"]):
        raise LingbotError(
            f"{root / 'meta' / 'episodes'}: {len(episodes)} episodes listed, info.json declares "
            f"{info['total_episodes']}"
        )
    tasks_table = _read_parquet(root / "meta" / "tasks.parquet").to_pandas()
    if "task_index" not in tasks_table.columns:
        raise LingbotError(f"{root / 'meta' / 'tasks.parquet'}: column 'task_index' missing")
    # LeRobot stores the task string as the pandas index ("task"); accept it as a column too.
    names = tasks_table["task"] if "task" in tasks_table.columns else tasks_table.index
    tasks = {int(i): str(t) for i, t in zip(tasks_table["task_index"], names)}

    return DatasetLayout(root=root, info=info, episodes=episodes, tasks=tasks)


def open_layout(root: Path, episodes: list[int] | None = None) -> DatasetLayout:
    """Check a local LeRobot v3 dataset's metadata and data files (those of `episodes` only, when
    given); read its episode and task tables."""
    layout = read_meta(root)
    layout = layout.over(layout.episodes) if episodes is None else layout.restricted(episodes)
    for path in layout.data_files:
        if not path.is_file():
            raise LingbotError(f"{path}: parquet file missing (referenced by meta/episodes)")
    return layout


def episode_meta_files(root: Path) -> list[Path]:
    """meta/episodes' parquet files, in order."""
    return sorted((Path(root) / "meta" / "episodes").glob("chunk-*/file-*.parquet"))


def episode_rows(table, layout: DatasetLayout, path: Path):
    """The rows of pyarrow `table` (read from `path`) that belong to `layout`'s episodes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "episode_index" not in table.column_names:
        raise LingbotError(f"{path}: column 'episode_index' missing")
    chosen = pa.array(layout.episodes["episode_index"].astype("int64").to_numpy())
    return table.filter(pc.is_in(table.column("episode_index"), value_set=chosen))


def read_frames(layout: DatasetLayout, columns: list[str] | None = None):
    """The frame table (all data parquet files, in episode order; a restricted layout's episodes
    only) as a pyarrow Table.

    Requested columns that no file has are left out (the caller's expectations report them).
    """
    import pyarrow as pa

    if columns is not None:
        present = set()
        for path in layout.data_files:
            present |= set(_read_parquet(path, schema_only=True).names)
        columns = [c for c in columns if c in present]
    if not layout.selected:
        return pa.concat_tables([_read_parquet(p, columns) for p in layout.data_files])
    reading = None if columns is None else list(dict.fromkeys([*columns, "episode_index"]))
    tables = [episode_rows(_read_parquet(path, reading), layout, path) for path in layout.data_files]
    return pa.concat_tables(tables if columns is None else [t.select(columns) for t in tables])


def episode_tasks(layout: DatasetLayout) -> dict[int, str]:
    """Episode index -> its (first) task string; an episode without one is an error naming it."""
    tasks = {}
    for ep in layout.episodes.to_dict("records"):
        listed = list(ep.get("tasks") if ep.get("tasks") is not None else [])
        if not listed:
            raise LingbotError(f"{layout.root}: episode {ep['episode_index']} has no task string")
        tasks[int(ep["episode_index"])] = str(listed[0])
    return tasks


def check_keys(layout: DatasetLayout, keys: list[str]) -> None:
    missing = [k for k in keys if k not in layout.features]
    if missing:
        raise LingbotError(
            f"{layout.root / 'meta' / 'info.json'}: feature {missing[0]!r} not in dataset "
            f"(it has: {', '.join(layout.features)})"
        )


def column_array(table, column: str, path: Path) -> np.ndarray:
    """A fixed-size vector column as a (N, D) float64 array."""
    if column not in table.column_names:
        raise LingbotError(f"{path}: column {column!r} missing")
    values = table.column(column).to_pylist()
    return np.asarray(values, dtype=np.float64).reshape(len(values), -1)


def read_state_action(layout: DatasetLayout, state_key: str, action_key: str):
    """(episode index per frame, (N, S) states, (N, A) actions) of the whole frame table, float64."""
    table = read_frames(layout, ["episode_index", state_key, action_key])
    where = layout.data_files[0].parent
    episode_index = table.column("episode_index").to_numpy()
    return episode_index, column_array(table, state_key, where), column_array(table, action_key, where)


def channel_names(names, dim: int) -> list[str]:
    """A vector feature's channel names in vector order: LeRobot writes a list, or a dict holding one
    list (e.g. {"motors": [...]}); anything else, or a wrong length, gives a0..a{dim-1}."""
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, (list, tuple)) and len(names) == dim and all(isinstance(n, str) for n in names):
        return list(names)
    return [f"a{i}" for i in range(dim)]


def fingerprint(root: Path) -> str:
    """sha256 over every file's relative path and content: changes whenever the dataset does."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _video_segments(layout: DatasetLayout, key: str) -> dict[Path, list[tuple[int, float, float]]]:
    """Per video file of camera `key`: (episode, from_timestamp, to_timestamp), sorted by start."""
    by_file: dict[Path, list[tuple[int, float, float]]] = {}
    for ep in layout.episodes.to_dict("records"):
        by_file.setdefault(layout.video_path(ep, key), []).append(
            (int(ep["episode_index"]), float(ep[f"videos/{key}/from_timestamp"]),
             float(ep[f"videos/{key}/to_timestamp"]))
        )
    return {path: sorted(segs, key=lambda s: s[1]) for path, segs in by_file.items()}


def iter_episode_frames(layout: DatasetLayout, key: str, episodes: list[int] | None = None, rgb: bool = True):
    """Decode camera `key` and yield `(episode, frames, error)` one episode at a time.

    v3 stores many episodes back to back in one MP4; each file is decoded once, front to back, and an
    episode is yielded as soon as its segment has been passed, so memory holds one episode's frames.
    `frames` is a (T, H, W, 3) uint8 array (or the frame count when `rgb` is False); on a missing or
    undecodable file it is None and `error` says why, naming the file.
    """
    import av

    wanted = None if episodes is None else set(int(e) for e in episodes)
    half_frame = 0.5 / layout.fps

    def finished(frames: list):
        if not rgb:
            return len(frames)
        return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)

    for path, segments in _video_segments(layout, key).items():
        segments = [s for s in segments if wanted is None or s[0] in wanted]
        if not segments:
            continue
        if not path.is_file():
            for ep, _, _ in segments:
                yield ep, None, f"{path}: video file missing (episode {ep}, {key})"
            continue
        current, frames = 0, []
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                # Start at the keyframe before the first wanted segment, not at the top of the file:
                # asking for one episode of a long file must not decode every episode before it.
                if segments[0][1] > half_frame:
                    container.seek(int((segments[0][1] - half_frame) / stream.time_base), stream=stream,
                                   backward=True)
                for frame in container.decode(stream):
                    t = float(frame.pts * stream.time_base) + half_frame
                    while current < len(segments) and t >= segments[current][2]:
                        yield segments[current][0], finished(frames), None
                        current, frames = current + 1, []
                    if current == len(segments):
                        break
                    if t >= segments[current][1]:
                        frames.append(frame.to_ndarray(format="rgb24") if rgb else None)
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            for ep, _, _ in segments[current:]:
                yield ep, None, f"{path}: cannot decode video ({exc.__class__.__name__}; episode {ep}, {key})"
            continue
        for ep, _, _ in segments[current:]:  # segments running to the end of the file
            yield ep, finished(frames), None
            frames = []
