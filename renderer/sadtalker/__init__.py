"""Native SadTalker talking-head renderer: clean PyTorch modules that load the official SadTalker checkpoints.

Map of the package (SPEC = the clean-room specification of upstream SadTalker's inference path):

Front half — source image and audio → driving coefficients:

* `audio` (SPEC §1.3, §4): `load_wav_16k(path)` → float32 mono 16 kHz; `num_frames(num_samples)` = floor(n / 640);
  `melspectrogram(wav)` → (80, T); `mel_windows(wav)` → (N, 1, 80, 16) float32, one window per video frame.
* `preprocess` (SPEC §3): `crop_face(image_rgb, landmarks68, preprocess, size)` → `CropResult(crop, crop_info,
  landmarks_in_crop)` for preprocess "crop" | "resize" | "full" (and upstream's "extcrop" | "extfull");
  `CropInfo.size` / `.paste_box` for the aspect restore and paste-back; `align_for_recon(crop, landmarks)` →
  (224×224×3 uint8, trans_params (W, H, s, tx, ty));
  `resize_bilinear(image, (w, h))` = OpenCV INTER_LINEAR, bit-exact. Landmarks come from `renderer.faces.detect_face`
  (dlib) instead of upstream's RetinaFace + FAN; the module docstring says what that changes.
* `recon` (SPEC §3.6, §9.1): `ReconNet` (ResNet-50 3DMM regressor, `ReconNet.from_state_dict(face_3drecon.* keys)`);
  `coeffs_from_crop(net, crop, landmarks)` → (coeff_3dmm (1, 73), full_3dmm (1, 257)).
* `audio2coeff` (SPEC §5): `ExpNet`, `PoseVAE` (`.from_state_dict(audio2exp.* / audio2pose.* keys)`);
  `predict_coeffs(exp_net, pose_net, mel_windows, source_coeff, *, pose_style, still, expression_scale, generator)`
  → (N, 70) float32 = expression 64 | angles 3 | translation 3. It already applies `expression_scale` (to the 64
  expression columns) and `still` (pose frozen to the source pose): the renderer must not apply them again.
  `predict_coeffs_batch(exp_net, pose_net, [CoeffRequest, …])` does several videos in one pass of each network
  (`recon.coeffs_from_crops` likewise for the 3DMM). Lower-level pieces: `random_blinks`, `predict_expression`,
  `predict_pose` / `predict_poses`, `pose_windows`, `smooth_pose`.
* `fold`: `fold_batchnorms(net)` folds the BatchNorms of the 3DMM and audio networks into their convolutions
  (done at load by the stage).

Back half — coefficients → frames:

* `facerender` (SPEC §6, §7): the networks `KPDetector`, `MappingNet`, `OcclusionAwareSPADEGenerator` and
  `FaceRenderer` (`prepare_source` once per video — the source feature volume is reused — then `driving_keypoints`
  and `render` per batch of frames), `fuse_for_inference` (batch norm and spectral norm folded into the
  convolutions); keypoint maths `transform_keypoints`; render preparation `target_coefficients`, `target_windows`,
  `camera_pose_sequence`, `image_to_tensor`, `frames_to_uint8`.
* `weights` (SPEC §2): `checkpoint_set(root, size, preprocess)`, `load_face_renderer`, `load_strict` — the
  safetensors layout split by prefix, or the legacy .pth set; pickles only with `weights_only=True`, and
  `python -m renderer.sadtalker.weights convert --trust FILE` for a one-time, explicit conversion of one that needs
  more.
* `paste` (SPEC §8.3): `PasteBack` — the animated crop blended back into the whole picture (preprocess "full").
* `graphs`: `RenderStep` (the per-batch render work as one module); `GraphedRender.capture(renderer, ...)` records
  one render batch as a CUDA graph and replays it.
* `compiled`: `compiled_step(renderer, example, dtype, folder)`, the render step compiled ahead of time by
  AOTInductor into a package on disk, loaded by later runs (`video.compile: true`).
* `kernels`: Triton kernels for the generator's elementwise work on CUDA (`bias_act_`: a convolution's bias with
  its activation or residual sum; `spade_modulate`: SPADE's biases, normalisation, modulation and LeakyReLU in one
  pass), with the same arithmetic as PyTorch ops wherever they do not run (CPU, compiling, another layout).
* `transfer`: `to_host` / `to_device`, host↔GPU copies through pinned buffers that do not stall other threads.
* `pipeline`: `run(jobs, pool)`, the "animate" stage for `video.renderer: sadtalker`: models load once per run,
  frames of several videos share forward batches (CUDA-graph replays on a GPU) and stream to encoder threads; videos
  are prepared (faces, 3DMM, audio networks) a few at a time, and on a GPU a thread prepares the next few while the
  current ones render.

Data: `data/lm3d_std.json` holds the 68 standard 3-D landmarks of the 3DMM alignment. Importing this package is light:
torch loads only with the network modules.
"""
