"""The demo frames the GPU machine needs, re-encoded so that OpenCV decodes them there.

The dataset's AV1 videos need PyAV (a 40 MB wheel); OpenCV, which GPU images have, decodes H.264. Each
camera's episodes go into one H.264 4:4:4 file (crf 8, ~40 dB from the dataset's frames), indexed by
frames.json; `FramePack` reads them back with `lingbot.vae.fit.load_frames`'s signature, so `fit_vae`
and `load_demos` take its `load_frames` as their `frames` argument.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lingbot.errors import LingbotError


def encode_frames(demos: Path, episodes: list[int], out: Path, crf: int = 8) -> dict:
    """Write `episodes` of every camera as one H.264 4:4:4 file per camera plus frames.json.

    Decoded back here with OpenCV (what the GPU machine has) to measure the re-encoding's PSNR and to
    prove that it decodes."""
    import av
    import numpy as np

    from lingbot.vae.fit import load_frames, read_demos

    manifest, _, layout = read_demos(demos)
    cameras = list(manifest["keys"]["cameras"])
    out.mkdir(parents=True, exist_ok=True)
    index = {"codec": "h264 yuv444p", "crf": crf, "cameras": {}, "episodes": list(map(int, episodes))}
    se = count = 0
    for c, key in enumerate(cameras):
        clips = load_frames(layout, [key], episodes)
        name = f"camera{c}.mkv"
        with av.open(str(out / name), "w") as container:
            # One thread: x264's output depends on the thread count.
            stream = container.add_stream("libx264", rate=40, options={"crf": str(crf), "preset": "slow",
                                                                     "threads": "1"})
            stream.height, stream.width = clips[0].shape[1:3]
            stream.pix_fmt = "yuv444p"
            for clip in clips:
                for frame in clip:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        rows, start = [], 0
        for ep, clip in zip(episodes, clips):
            rows.append([int(ep), start, len(clip)])
            start += len(clip)
        index["cameras"][key] = {"file": name, "episodes": rows}
        decoded = decode_video(out / name)
        if len(decoded) != start:
            raise LingbotError(f"prepare: {out / name}: OpenCV decoded {len(decoded)} frames of {start}")
        reference = np.concatenate(clips)
        se += float(((decoded.astype(np.float64) - reference) ** 2).sum())
        count += reference.size
    index["psnr_db_vs_dataset_frames"] = round(10 * math.log10(255**2 / max(se / count, 1e-12)), 2)
    (out / "frames.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def decode_video(path: Path):
    """(N, H, W, 3) uint8 RGB frames of a video, through OpenCV."""
    import cv2
    import numpy as np

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])
    capture.release()
    if not frames:
        raise LingbotError(f"{path}: OpenCV decoded no frames (its FFmpeg lacks the codec?)")
    return np.ascontiguousarray(np.stack(frames))


class FramePack:
    """The carried frames, with `lingbot.vae.fit.load_frames`'s signature (camera-major clips)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.index = json.loads((self.root / "frames.json").read_text())
        self._decoded: dict[str, object] = {}

    @property
    def episodes(self) -> list[int]:
        return list(self.index["episodes"])

    def load_frames(self, layout, cameras: list[str], episodes: list[int]) -> list:
        clips = []
        for key in cameras:
            entry = self.index["cameras"].get(key)
            if entry is None:
                raise LingbotError(f"{self.root}: camera {key!r} not carried")
            if key not in self._decoded:
                self._decoded[key] = decode_video(self.root / entry["file"])
            rows = {ep: (start, n) for ep, start, n in entry["episodes"]}
            for ep in episodes:
                if int(ep) not in rows:
                    raise LingbotError(f"{self.root}: episode {ep} of {key} not carried")
                start, n = rows[int(ep)]
                clips.append(self._decoded[key][start : start + n])
        return clips
