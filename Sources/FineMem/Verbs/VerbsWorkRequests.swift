import CVerbs

/// Where each verb of a batch keeps its local bytes in the slab.
package struct VerbsSlabLayout: Sendable, Hashable {
    /// Offset in the slab of each verb's local buffer, by position in the chunk (WRITE source, READ destination, the
    /// 8-byte atomic reply), 8-byte aligned.
    package var offsets: [Int]
    /// Bytes of slab the batch needs.
    package var bytes: Int

    package init(_ verbs: ArraySlice<Verb>) {
        var offsets: [Int] = []
        offsets.reserveCapacity(verbs.count)
        var next = 0
        for verb in verbs {
            offsets.append(next)
            next += (max(verb.payloadBytes, 0) + 7) / 8 * 8
        }
        self.offsets = offsets
        bytes = next
    }
}

/// Storage for a chain of send work requests and their scatter/gather entries, linked
/// through `next`, reused from batch to batch (no allocation per verb).
///
/// `fill` builds the chain for a batch as a pure function of its verbs, the slab address
/// and key: one `ibv_send_wr` per verb, `wr_id` its index in the batch, the fence flag
/// where the verb asks for it, and `IBV_SEND_SIGNALED` on the last one only (a failing
/// verb completes with an error whether signalled or not, and RC completions come in
/// order, so the last completion vouches for the whole batch).
package final class VerbsWorkRequestChain: @unchecked Sendable {
    package private(set) var capacity: Int
    package private(set) var requests: UnsafeMutableBufferPointer<ibv_send_wr>
    package private(set) var gatherEntries: UnsafeMutableBufferPointer<ibv_sge>
    /// Requests filled by the last `fill`.
    package private(set) var count = 0

    package init(capacity: Int) {
        self.capacity = capacity
        requests = .allocate(capacity: capacity)
        gatherEntries = .allocate(capacity: capacity)
    }

    deinit {
        requests.deallocate()
        gatherEntries.deallocate()
    }

    /// Fills the chain for `verbs` (at most `capacity`), whose local buffers are at
    /// `layout.offsets` (built from the same verbs) from `slabAddress` in the region of `lkey`. WRITE payloads are not
    /// copied here (see `VerbsConnection`). Atomic operands are host-order integers: the NIC
    /// applies them to the remote word in the responder's byte order (`VerbsNIC` checks at
    /// start that it is little-endian, as FineMem's words are).
    package func fill(
        _ verbs: ArraySlice<Verb>, layout: VerbsSlabLayout, slabAddress: UInt64, lkey: UInt32
    ) {
        precondition(verbs.count <= capacity && verbs.count > 0, "a chain holds 1...\(capacity) requests, not \(verbs.count)")
        count = verbs.count
        for (position, index) in verbs.indices.enumerated() {
            let verb = verbs[index]
            var sge = ibv_sge()
            sge.addr = slabAddress + UInt64(layout.offsets[position])
            sge.length = UInt32(clamping: max(verb.payloadBytes, 0))
            sge.lkey = lkey
            gatherEntries[position] = sge
            var wr = ibv_send_wr()
            wr.wr_id = UInt64(index)
            wr.sg_list = gatherEntries.baseAddress! + position
            wr.num_sge = 1
            wr.next = position + 1 < verbs.count ? requests.baseAddress! + position + 1 : nil
            var flags: UInt32 = 0
            if verb.isFenced { flags |= IBV_SEND_FENCE.rawValue }
            if position + 1 == verbs.count { flags |= IBV_SEND_SIGNALED.rawValue }
            wr.send_flags = flags
            switch verb {
            case .read(let address, _, let rkey, _):
                wr.opcode = IBV_WR_RDMA_READ
                wr.wr.rdma.remote_addr = address.rawValue
                wr.wr.rdma.rkey = rkey.rawValue
            case .write(let address, _, let rkey, _):
                wr.opcode = IBV_WR_RDMA_WRITE
                wr.wr.rdma.remote_addr = address.rawValue
                wr.wr.rdma.rkey = rkey.rawValue
            case .compareAndSwap(let address, let expected, let desired, let rkey, _):
                wr.opcode = IBV_WR_ATOMIC_CMP_AND_SWP
                wr.wr.atomic.remote_addr = address.rawValue
                wr.wr.atomic.compare_add = expected
                wr.wr.atomic.swap = desired
                wr.wr.atomic.rkey = rkey.rawValue
            case .fetchAndAdd(let address, let delta, let rkey, _):
                wr.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD
                wr.wr.atomic.remote_addr = address.rawValue
                wr.wr.atomic.compare_add = delta
                wr.wr.atomic.rkey = rkey.rawValue
            }
            requests[position] = wr
        }
    }

    /// The first request of the filled chain.
    package var head: UnsafeMutablePointer<ibv_send_wr> { requests.baseAddress! }
}

/// The typed error for a failed work completion of verb `index` of a batch.
///
/// | status | error |
/// |---|---|
/// | `REM_ACCESS_ERR` | `remoteAccess(.accessRefused)` |
/// | `REM_INV_REQ_ERR` | `remoteAccess(.misalignedAtomic)` for a misaligned atomic, else `.invalidRequest` |
/// | `REM_OP_ERR` | `remoteAccess(.remoteOperationFailed)` |
/// | `RETRY_EXC_ERR`, `RNR_RETRY_EXC_ERR`, `RESP_TIMEOUT_ERR` | `peerDead` (nobody answers) |
/// | `WR_FLUSH_ERR` | `connectionBroken` (the QP was already in the error state) |
/// | anything else | `localNIC(status:)` |
package func verbsFabricError(status: ibv_wc_status, verb: Verb, index: Int, remote: NodeID) -> FabricError {
    switch status {
    case IBV_WC_REM_ACCESS_ERR:
        return .remoteAccess(.accessRefused, address: verb.address, rkey: verb.rkey, verbIndex: index)
    case IBV_WC_REM_INV_REQ_ERR:
        let misaligned = verb.kind.isAtomic && verb.address.rawValue % 8 != 0
        return .remoteAccess(misaligned ? .misalignedAtomic : .invalidRequest, address: verb.address, rkey: verb.rkey, verbIndex: index)
    case IBV_WC_REM_OP_ERR:
        return .remoteAccess(.remoteOperationFailed, address: verb.address, rkey: verb.rkey, verbIndex: index)
    case IBV_WC_RETRY_EXC_ERR, IBV_WC_RNR_RETRY_EXC_ERR, IBV_WC_RESP_TIMEOUT_ERR:
        return .peerDead(remote)
    case IBV_WC_WR_FLUSH_ERR:
        return .connectionBroken(remote)
    default:
        return .localNIC(status: verbsStatusName(status), verbIndex: index)
    }
}

/// `ibv_wc_status_str` with the numeric status.
package func verbsStatusName(_ status: ibv_wc_status) -> String {
    "\(String(cString: ibv_wc_status_str(status))) (\(status.rawValue))"
}
