"""The ctypes work requests of verbs/poster.py: layout of libibverbs' ABI and batch linking.

Pure ctypes, no device: posting them is tested against rxe in tests/rdma/test_verbs.py."""

from __future__ import annotations

import ctypes

from rdmaproxy.verbs.poster import IbvSendWr, IbvSge, _build


def test_send_wr_matches_the_libibverbs_abi() -> None:
    # struct ibv_send_wr is 128 bytes on LP64; these offsets are what providers read
    assert ctypes.sizeof(IbvSendWr) == 128
    assert ctypes.sizeof(IbvSge) == 16
    assert IbvSendWr.wr_id.offset == 0
    assert IbvSendWr.next.offset == 8
    assert IbvSendWr.sg_list.offset == 16
    assert IbvSendWr.num_sge.offset == 24
    assert IbvSendWr.opcode.offset == 28
    assert IbvSendWr.send_flags.offset == 32
    assert IbvSendWr.imm_data.offset == 36
    assert IbvSendWr.wr.offset == 40  # union wr: rdma.remote_addr, then rdma.rkey at 48


def test_a_batch_is_one_linked_chain_with_its_own_scatter_entries() -> None:
    batch = [
        (1, 10, 0x1000, 4096, 7, 0, 0x01000005, (0xAA000, 99)),  # WRITE WITH IMM
        (1, 11, 0x2000, 8, 8, 2 | 8, 0x03000005, (0xBB008, 98)),  # inline, signaled
        (2, 12, 0x3000, 40, 9, 2, 0, None),  # SEND
    ]
    wrs, sges = _build(batch)
    address = ctypes.addressof(wrs)
    for i, (opcode, wr_id, addr, length, lkey, flags, imm, remote) in enumerate(batch):
        wr = wrs[i]
        assert (wr.wr_id, wr.opcode, wr.send_flags, wr.imm_data) == (wr_id, opcode, flags, imm)
        assert wr.num_sge == 1
        assert ctypes.addressof(wr.sg_list.contents) == ctypes.addressof(sges[i])
        assert (sges[i].addr, sges[i].length, sges[i].lkey) == (addr, length, lkey)
        if remote is not None:
            assert (wr.wr.rdma.remote_addr, wr.wr.rdma.rkey) == remote
        else:
            assert (wr.wr.rdma.remote_addr, wr.wr.rdma.rkey) == (0, 0)
        if i + 1 < len(batch):
            assert ctypes.addressof(wr.next.contents) == address + 128 * (i + 1)
        else:
            assert not wr.next  # NULL ends the chain
