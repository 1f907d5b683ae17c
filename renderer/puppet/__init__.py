"""The puppet animator: a talking head drawn from one portrait without any network weights.

Map of the package:

* `pipeline`: the "animate" stage (`run(jobs, pool)`, `animate(...)`): framing, the frame loop, track.json.
* `motion`: what the face does per 40 ms video frame (mouth from the speech envelope or phoneme timings, blinks,
  head sway), pure numpy on per-frame arrays, computed before the first frame is drawn.
* `rig`: the face rig: a landmark mesh over the portrait, deformed per frame and drawn with one dense remap, and the
  painted mouth interior and eyelids.

`renderer.puppet:run` is the stage function (`batch.stages.TARGETS`).
"""

from renderer.puppet.pipeline import run

__all__ = ["run"]
