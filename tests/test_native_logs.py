"""MediaPipe's native start-up noise is dropped at the file-descriptor level; anything else gets through."""

from __future__ import annotations

import os

import numpy as np

from tasks.common.native_logs import call_quietly

NOISE = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
         b"W0000 00:00:1796315397.798174   19436 inference_feedback_manager.cc:114] Feedback manager requires a "
         b"model with a single signature inference. Disabling support for feedback tensors.\n")  # fmt: skip


def test_known_noise_is_dropped_and_other_native_output_kept(capfd):
    def native():  # what C++ code does: write to fd 2 directly, bypassing sys.stderr
        os.write(2, NOISE + b"E0000 something real went wrong\n" + NOISE)
        return 7

    assert call_quietly(native) == 7
    err = capfd.readouterr().err
    assert err == "E0000 something real went wrong\n"


def test_facemesh_creation_and_first_frames_print_nothing(capfd):
    from tasks.common.facemesh import FaceMesh

    for static in (False, True):
        mesh = FaceMesh(static_image_mode=static)
        for _ in range(2):
            assert mesh(np.zeros((64, 64, 3), np.uint8)) is None  # no face: nothing found, nothing printed
    err = capfd.readouterr().err
    assert "Feedback manager" not in err and "XNNPACK" not in err, err
