/// The answer of one commit attempt on a logged header.
enum CommitResult<Header: LoggedHeader>: Sendable {
    /// The CAS committed this header word.
    case committed(Header)
    /// Another operation changed the header first; this is the word the CAS found.
    case lost(UInt64)
    /// The transition does not apply to the cached header (the cache may be stale).
    case notApplicable
}

extension BlockAllocator {
    /// One commit attempt: decide the expected word (folding in this node's queued log on
    /// the header, or predicting that an in-flight flush lands first), apply `transition`
    /// to the settled header, and send the CAS, preceded in the same doorbell by the
    /// folded log's record WRITE. `requeue` hands a folded log back when the CAS did not
    /// commit, so that it is still flushed.
    func commit<Header: LoggedHeader>(
        _ type: Header.Type, at address: RemoteAddress, cached: UInt64, on node: MemoryNodeState<Connection>,
        trace: inout OperationTrace, requeue: (PreparedHeader, Bool) -> Void, _ transition: (Header) -> Header?
    ) async throws(AllocationError) -> CommitResult<Header> {
        let prepared = prepareHeader(type, cached: cached, at: address, pending: node.pending, recordKey: node.metadataKey)
        guard let base = Header(rawValue: prepared.base), let desired = transition(base) else {
            requeue(prepared, false)
            return .notApplicable
        }
        let verbs = (prepared.flush.map { [$0] } ?? []) + [.compareAndSwap(address, expected: prepared.expected, desired: desired.rawValue, rkey: node.metadataKey)]
        let answer: (exchanged: Bool, original: UInt64)
        do {
            answer = try await post(verbs, on: node, trace: &trace).last!.compareAndSwap
        } catch {
            requeue(prepared, false)
            throw error
        }
        requeue(prepared, answer.exchanged)
        return answer.exchanged ? .committed(desired) : .lost(answer.original)
    }

    /// Marks `address` busy for this node's CAS, waiting (locally, with backoff) while
    /// another task of this node has a CAS in flight on it: two tasks of one node racing
    /// for one header would only cost each other a round trip.
    func acquireBusy(_ address: RemoteAddress, on node: MemoryNodeState<Connection>, backoff: inout Backoff) async throws(AllocationError) {
        while !node.cache.withLock({ $0.busy.insert(address).inserted }) {
            try await backoff.pause(runtime)
        }
    }

    func releaseBusy(_ address: RemoteAddress, on node: MemoryNodeState<Connection>) {
        node.cache.withLock { _ = $0.busy.remove(address) }
    }

    /// Whether a commit on this cached header would have to wait for a flush: it carries a
    /// pending log that is not this node's queued one (which a commit folds in instead).
    /// Searches rank such headers after clean ones.
    func waitsForFlush<Header: LoggedHeader>(_ type: Header.Type, _ word: UInt64, at address: RemoteAddress, on node: MemoryNodeState<Connection>) -> Bool {
        isPendingLog(type, word) && !node.pending.withLock { $0.isQueued(address) }
    }

    /// `header` with its contention mark set or cleared after `failures` lost CASes.
    func markingContention<Header: LoggedHeader>(_ header: Header, failures: Int) -> Header {
        if failures >= configuration.contentionHigh, !header.contended { return header.with(contended: true) }
        if failures <= configuration.contentionLow, header.contended { return header.with(contended: false) }
        return header
    }
}
