"""lerobot_io reads LeRobot v3 datasets itself (see its docstring for why): it must read what LeRobot reads."""

import numpy as np
import pytest

from lingbot.data.lerobot_io import iter_episode_frames, open_layout, read_frames


def _values(column) -> list:
    return [np.asarray(v).tolist() for v in column]


def test_the_layout_holds_the_tables_lerobot_reads(collected):
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    root = collected[0]
    layout = open_layout(root)
    meta = LeRobotDatasetMetadata("lingbot/collected", root=root)
    assert layout.info == meta.info.to_dict()
    assert (layout.fps, layout.video_keys) == (meta.fps, meta.video_keys)
    assert layout.tasks == {int(i): task for task, i in meta.tasks["task_index"].items()}
    theirs = meta.episodes.to_pandas().sort_values("episode_index").reset_index(drop=True)
    assert list(layout.episodes.columns) == list(theirs.columns)
    for column in theirs.columns:
        assert layout.episodes[column].dtype == theirs[column].dtype, column
        assert _values(layout.episodes[column]) == _values(theirs[column]), column
    for i, episode in enumerate(layout.episodes.to_dict("records")):
        assert layout.data_path(episode) == root / meta.get_data_file_path(i)
        for key in layout.video_keys:
            assert layout.video_path(episode, key) == root / meta.get_video_file_path(i, key)


@pytest.mark.parametrize("episodes", [None, [1, 3]])
def test_decoded_frames_are_the_pixels_lerobot_decodes(collected, episodes):
    """Every frame equals LeRobot's `decode_video_frames` at the timestamps `LeRobotDataset` would ask
    for (segment start + the frame's `timestamp`), with the backend LeRobot picks on this machine."""
    from lerobot.datasets.video_utils import decode_video_frames
    from lerobot.utils.import_utils import get_safe_default_video_backend

    backend = get_safe_default_video_backend()
    layout = open_layout(collected[0])
    rows = {int(r["episode_index"]): r for r in layout.episodes.to_dict("records")}
    table = read_frames(layout, ["episode_index", "timestamp"])
    frame_episode, timestamp = table.column("episode_index").to_numpy(), table.column("timestamp").to_numpy()
    for key in layout.video_keys:
        seen = []
        for ep, frames, error in iter_episode_frames(layout, key, episodes):
            assert error is None
            start = float(rows[ep][f"videos/{key}/from_timestamp"])
            asked = [start + float(t) for t in timestamp[frame_episode == ep]]
            theirs = decode_video_frames(layout.video_path(rows[ep], key), asked, tolerance_s=1e-4,
                                         backend=backend, return_uint8=True)
            assert frames.dtype == np.uint8 and len(frames) == rows[ep]["length"]
            np.testing.assert_array_equal(frames, theirs.permute(0, 2, 3, 1).numpy(), err_msg=f"{key} episode {ep}")
            seen.append(ep)
        assert seen == (episodes or sorted(rows))
