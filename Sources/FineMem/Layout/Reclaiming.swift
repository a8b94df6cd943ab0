/// The header transitions of recovery: reclaiming the blocks of a fenced compute node.
///
/// Recovery acts in the dead node's name. Its commit on a span header frees every block of
/// the dead node there at once (on a section header, one block, see below) and leaves the
/// header pending with a log naming the dead node (its own log if one was pending, else a
/// new one describing the first block freed), so that nobody else commits on the header
/// until the records are written and the bit is cleared: the same rules (L1-L4) as a free
/// of the node itself. A pending log of the dead node whose run is all set is an allocation it committed
/// and never handed out (or did): it is freed with the rest.
extension SpanHeader {
    /// Frees the chunks of `runs` that are in use and, when a log of `owner` is pending
    /// here and describes an allocation, its run. Nil when the header carries someone
    /// else's pending log (wait for its flush) or nothing of `owner` is in use.
    package func reclaiming(_ runs: [HeaderRun], of owner: OwnerID) -> SpanHeader? {
        if logPending, log.owner != owner { return nil }
        guard mode == .open else { return nil }
        var freed = runs.filter { Self.holds($0) && marksAllocated($0) }
        if logPending, logDescribesAllocation { freed.append(log.run) }
        guard let first = freed.first else { return nil }
        let mask = freed.reduce(UInt32(0)) { $0 | Self.runMask($1) }
        let newLog = logPending
            ? log : TemporaryLog(offset: UInt8(first.offset), sizeCode: UInt8(first.countLog2), owner: owner, sequence: log.sequence.next)
        return SpanHeader(bitmap: bitmap & ~mask, mode: .open, contended: contended, logPending: true, log: newLog)
    }
}

extension SectionHeader {
    /// Frees the whole spans of `run` (a section-layer block of `owner`) if they are held,
    /// or, when `inMultiSectionBlock` (the section lies in a multi-section block of
    /// `owner`) or a multi-section log of `owner` is pending here, the whole section; a
    /// pending section-layer allocation of `owner` is freed too. One block a CAS: the log
    /// describes exactly the spans freed, so that none of them enters chunk mode before
    /// the block's record is written (`pendingLogCovers`). Nil as `SpanHeader.reclaiming`.
    package func reclaiming(_ run: HeaderRun?, inMultiSectionBlock: Bool, of owner: OwnerID) -> SectionHeader? {
        if logPending, log.owner != owner { return nil }
        let pendingMulti = logPending && log.sizeCode == Self.multiSectionSizeCode
        if inMultiSectionBlock || pendingMulti {
            guard isAllWhole else { return nil }
            let newLog = logPending
                ? log : TemporaryLog(offset: 0, sizeCode: Self.multiSectionSizeCode, owner: owner, sequence: log.sequence.next)
            return SectionHeader(states: 0, contended: contended, logPending: true, log: newLog)
        }
        if logPending {
            // Our own log first: a pending allocation of the node is freed under it.
            guard logDescribesAllocation else { return nil }
            return SectionHeader(states: states & ~Self.runMask(log.run), contended: contended, logPending: true, log: log)
        }
        guard let run, Self.holds(run), marksAllocated(run) else { return nil }
        return releasing(run, owner: owner)
    }
}

extension NodeSlot {
    /// Fencing: a live or suspected node is declared dead (its connections are already in
    /// the error state and its keys revoked when this is written).
    package func fencing() -> NodeSlot? {
        guard state == .alive || state == .suspected else { return nil }
        return NodeSlot(heartbeat: heartbeat, state: .dead, incarnation: incarnation)
    }
}
