import asyncio, time
import pytest
from ztunnel.hbone import HboneConfig
from ztunnel.hbone.http2.settings import H2Settings
from ztunnel.hbone.http2 import connection as cm
from tests.integration.hbone.test_hbone_flood import start_flooder, stop, round_trips, p99

@pytest.fixture(params=[256, 0])
def hbone_config(request):
    u = 10**9
    return HboneConfig(h2=H2Settings(max_window_updates_per_second=u, max_tiny_data_per_second=u), max_frames_per_turn=request.param)

async def test_dbg(harness, client_cert, echo_port, pem_files, tmp_path):
    stats = {"bytes": 0, "calls": 0, "time": 0.0, "max": 0.0}
    orig = cm.H2Connection.receive_some
    def rs(self, data, max_frames=0):
        t = time.perf_counter()
        r = orig(self, data, max_frames)
        d = time.perf_counter() - t
        stats["bytes"] += r[1]; stats["calls"] += 1; stats["time"] += d; stats["max"] = max(stats["max"], d)
        return r
    cm.H2Connection.receive_some = rs
    try:
        proc = await start_flooder(harness, client_cert, pem_files, tmp_path, "window_update", 3.0, f"127.0.0.1:{echo_port}")
        t0 = time.process_time()
        samples = await round_trips(harness, client_cert, echo_port, 2.5)
        cpu = time.process_time() - t0
        p99(samples)
        print(await stop(proc))
    finally:
        cm.H2Connection.receive_some = orig
    print(harness.config.max_frames_per_turn, stats, "cpu", cpu)
