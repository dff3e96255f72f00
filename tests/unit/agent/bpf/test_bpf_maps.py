"""Map value layouts and per-CPU counter decoding."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.bpf.codes import DROP_SLOTS, DropReason
from agent.bpf.maps import MAP_LAYOUTS, PodCounters, decode_counters, encode_counters
from agent.bpf.pins import MAP_NAMES


def test_layouts_match_the_c_structs() -> None:
    # struct veil_pod {__be32; __u32}, veil_local_pod {__u32; __u32},
    # veil_counters {3 x __u64; __u64[VEIL_DROP_SLOTS]}, veil_config {__be32; __u32; __u8[32]}.
    assert MAP_LAYOUTS["pods"].value_size == 8
    assert MAP_LAYOUTS["local_ips"].value_size == 8
    assert MAP_LAYOUTS["counters"].value_size == 8 * (3 + DROP_SLOTS)
    assert MAP_LAYOUTS["config"].value_size == 40
    four = ("pods", "local_ips", "counters", "config")
    assert all(MAP_LAYOUTS[name].key_size == 4 for name in four)
    # struct veil_pod_addr_key {__u32 ifindex; __u8 family; __u8 pad[3]; __be32 addr[4]},
    # struct veil_ip6 {__be32 addr[4]}.
    assert MAP_LAYOUTS["pod_addrs"].key_size == 24
    assert MAP_LAYOUTS["pod_addrs"].value_size == 4
    assert MAP_LAYOUTS["local_ips6"].key_size == 16
    assert MAP_LAYOUTS["local_ips6"].value_size == 8
    assert tuple(MAP_LAYOUTS) == MAP_NAMES
    # Per-CPU values are copied in 8-byte strides; ours need no padding.
    assert MAP_LAYOUTS["counters"].value_size % 8 == 0


_reasons = st.sampled_from([r for r in DropReason if r is not DropReason.NONE])
_count = st.integers(min_value=0, max_value=2**40)
_counters = st.builds(
    PodCounters,
    _count,
    _count,
    _count,
    st.dictionaries(_reasons, st.integers(min_value=1, max_value=2**40), max_size=5),
)


@given(st.lists(_counters, min_size=1, max_size=8))
def test_decode_sums_every_cpu(per_cpu: list[PodCounters]) -> None:
    total = decode_counters(encode_counters(per_cpu), len(per_cpu))
    assert total.outbound_redirected == sum(c.outbound_redirected for c in per_cpu)
    assert total.inbound_redirected == sum(c.inbound_redirected for c in per_cpu)
    assert total.established == sum(c.established for c in per_cpu)
    for reason in DropReason:
        want = sum(c.drop_count(reason) for c in per_cpu)
        assert total.drop_count(reason) == want
    assert total.dropped == sum(c.dropped for c in per_cpu)


def test_counts_in_unknown_slots_are_ignored() -> None:
    raw = bytearray(encode_counters([PodCounters()]))
    raw[8 * (3 + DROP_SLOTS - 1)] = 7  # the last slot has no DropReason yet
    assert decode_counters(bytes(raw), 1).drops == {}


def test_to_dict_uses_labels_and_skips_zero() -> None:
    c = PodCounters(1, 2, 3, {DropReason.SPOOFED_SOURCE: 4, DropReason.NO_LISTENER: 0})
    assert c.to_dict() == {
        "outbound_redirected": 1,
        "inbound_redirected": 2,
        "established": 3,
        "drops": {"spoofed_source": 4},
    }


def test_layout_mismatch_is_refused_with_a_hint() -> None:
    from pathlib import Path

    import pytest

    from agent.bpf import syscall
    from agent.bpf.maps import check_layout
    from agent.errors import MapError

    good = MAP_LAYOUTS["pods"]
    info = syscall.MapInfo(
        1, good.type, good.key_size, good.value_size, good.max_entries, "veil_pods"
    )
    check_layout("pods", info, Path("/sys/fs/bpf/veil/pods"))
    bigger = syscall.MapInfo(1, good.type, 4, good.value_size + 8, good.max_entries, "veil_pods")
    with pytest.raises(MapError) as err:
        check_layout("pods", bigger, Path("/sys/fs/bpf/veil/pods"))
    assert "uninstall" in (err.value.hint or "")
