import sys, torch, numpy as np
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
import bench_sadtalker as b
from renderer.sadtalker import facerender as fr
r, _ = b.build_renderer("cuda")
rng = np.random.default_rng(0)
for size, batch in ((256, 8),):
    img = torch.rand(1, 3, size, size, device="cuda"); sem = torch.randn(1, 70, fr.WINDOW, device="cuda")
    w = torch.randn(batch, 70, fr.WINDOW, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        st = r.prepare_source(img, sem)
        f = st.feature.expand(batch, -1, -1, -1, -1).contiguous(); kc = st.kp_canonical.expand(batch, -1, -1); ks = st.kp_source.expand(batch, -1, -1)
        for _ in range(3): b._step(r, kc, ks, f, w)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as p:
            for _ in range(5): b._step(r, kc, ks, f, w)
            torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
