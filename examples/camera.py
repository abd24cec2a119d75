"""A camera-style producer with two consumers of full-HD frames.

The camera makes 1920x1080x3 uint8 frames at ``--fps`` and hands each one
to two consumers, each through its own zero-copy channel (a ring plus a pool
of frame-sized slots; a frame is copied once, into a slot, and the consumer
reads it in place):

* **display** (fast) wants the newest frame.  The camera never waits for it:
  ``send_nowait``, and a frame the display has no free slot for is dropped
  for the display (counted; typically none, as the display keeps up).
* **analyser** (slow, ``--analyse-ms`` per frame) must see every frame.  The
  camera sends with a blocking ``send``: when the analyser's slots are all
  taken, the camera waits (back-pressure) -- nothing is dropped, and the
  report says how long the camera was held up.

    python examples/camera.py --frames 100 --fps 30 --analyse-ms 40

Each consumer checks the frame numbers it got (in order, none twice; the
analyser: none missing) and reports back on a small shmq.Queue.
"""
import argparse
import multiprocessing as mp
import time

import numpy as np

import shmq

SHAPE = (1080, 1920, 3)
FRAME_BYTES = int(np.prod(SHAPE))
SLOT = 8 << 20  # one frame (5.9 MiB) per slot


def display(rx: shmq.ReceiveChannel, reports: shmq.Queue) -> None:
    """Fast consumer: looks at each frame it gets, drops none itself."""
    shown, last = 0, -1
    while True:
        msg = rx.receive(timeout=30)
        if msg is None:  # the camera's end-of-stream sentinel
            break
        assert msg["id"] > last, "frames out of order"
        last = msg["id"]
        frame = msg["frame"]  # read-only view of the slot: nothing was copied
        _ = frame[540, 960]  # "draw" it (a real display would blit here)
        shown += 1
        del msg, frame  # the slot goes back to the camera now
    reports.put(("display", {"shown": shown, "last": last}))
    rx.close()
    reports.close()


def analyse(rx: shmq.ReceiveChannel, reports: shmq.Queue, work_s: float) -> None:
    """Slow consumer: must see every frame, in order."""
    ids, brightness = [], []
    while True:
        msg = rx.receive(timeout=30)
        if msg is None:
            break
        ids.append(msg["id"])
        brightness.append(float(msg["frame"][::8, ::8].mean()))  # reads the slot in place
        time.sleep(work_s)  # stands for a slow model
        del msg
    reports.put(("analyser", {"analysed": len(ids), "in_order": ids == list(range(len(ids))),
                              "mean_brightness": round(sum(brightness) / max(1, len(brightness)), 1)}))
    rx.close()
    reports.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=100, help="frames to send (100)")
    p.add_argument("--fps", type=float, default=30.0, help="camera frame rate (30)")
    p.add_argument("--analyse-ms", type=float, default=40.0, help="analyser time per frame (40 ms)")
    p.add_argument("--start-method", default=None, choices=mp.get_all_start_methods())
    args = p.parse_args()
    ctx = mp.get_context(args.start_method)

    # Two slots for the display (one being shown, one arriving), eight for the
    # analyser (a burst of eight frames before the camera must wait).
    display_tx, display_rx = shmq.open_channel(slot_size=SLOT, slot_count=2)
    analyse_tx, analyse_rx = shmq.open_channel(slot_size=SLOT, slot_count=8)
    reports = shmq.Queue()
    consumers = [
        ctx.Process(target=display, args=(display_rx, reports)),
        ctx.Process(target=analyse, args=(analyse_rx, reports, args.analyse_ms / 1000)),
    ]
    for c in consumers:
        c.start()

    frame = np.empty(SHAPE, np.uint8)
    dropped = 0
    blocked = 0.0
    period = 1.0 / args.fps
    start = time.perf_counter()
    for i in range(args.frames):
        # Wait for the camera's next frame time, then "capture" into `frame`.
        time.sleep(max(0.0, start + i * period - time.perf_counter()))
        frame[:] = i % 256
        msg = {"id": i, "frame": frame}
        try:
            display_tx.send_nowait(msg)  # copied into a display slot, or dropped
        except shmq.Full:
            dropped += 1
        t = time.perf_counter()
        analyse_tx.send(msg, timeout=30)  # copied into an analyser slot; waits if none is free
        blocked += time.perf_counter() - t
    display_tx.send(None, timeout=30)
    analyse_tx.send(None, timeout=30)
    elapsed = time.perf_counter() - start

    got = dict(reports.get(timeout=60) for _ in consumers)
    for c in consumers:
        c.join(30)
    print(f"camera: {args.frames} frames in {elapsed:.2f} s ({args.frames / elapsed:.1f} fps, asked {args.fps:g}); "
          f"waited {blocked:.2f} s for the analyser")
    print(f"display: shown {got['display']['shown']}, dropped {dropped}")
    a = got["analyser"]
    print(f"analyser: analysed {a['analysed']} of {args.frames}, in order: {a['in_order']}, "
          f"mean brightness {a['mean_brightness']}")
    ok = (a["analysed"] == args.frames and a["in_order"]
          and got["display"]["shown"] + dropped == args.frames
          and all(c.exitcode == 0 for c in consumers))
    print("OK" if ok else "FAILED")
    for end in (display_tx, display_rx, analyse_tx, analyse_rx, reports):
        end.close()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
