/// Leases: a compute node proves it is alive by advancing the heartbeat of its slot in
/// every memory node's node table, one CAS per memory node per interval. A memory node's
/// monitor that sees no advance for a number of intervals fences the node and recovers
/// it. A renewal that finds its slot no longer alive (or of another incarnation), or its
/// connection broken, learns that the memory node is out of reach for this incarnation
/// (fenced, or dead): from then on its operations there fail with `fenced`, whatever its
/// clocks say, and allocations go to the other memory nodes, where the node is still
/// alive (and can still free what it holds there). Recovery on the memory node that
/// fenced it reclaims its blocks there; the node comes back there only by starting anew.
extension BlockAllocator {
    /// Renews the lease on every memory node still in reach (one doorbell each). Answers
    /// the memory nodes this renewal found out of reach: the slot no longer this
    /// incarnation's alive one (fenced), or the connection failed (fenced, or the memory
    /// node is dead: the queue pair is in the error state either way).
    @discardableResult
    package func renewLeases() async -> [NodeID] {
        var lost: [NodeID] = []
        for link in links where isUsable(link) {
            var trace = OperationTrace()
            let address = link.grant.nodeSlotAddress(owner)
            let incarnation = link.incarnation
            let outcome: UpdateOutcome<NodeSlot>
            do {
                outcome = try await link.update(
                    .word(address, known: link.leaseWord.withLock { $0 }),
                    UpdatePolicy(attemptsMax: 2, rereadOnRefusal: true), trace: &trace
                ) { slot in slot.incarnation == incarnation ? slot.beating() : nil }
            } catch {
                lost.append(link.memoryNode)
                continue
            }
            switch outcome {
            case .updated(let slot), .committed(let slot, _):
                link.leaseWord.withLock { $0 = slot.rawValue }
            case .refused:
                lost.append(link.memoryNode)
            case .lost(let current):
                // Two monitors' marks in a row; the next renewal starts from this word.
                link.leaseWord.withLock { $0 = current }
            }
        }
        for link in links where lost.contains(link.memoryNode) { markUnusable(link) }
        return lost
    }

    /// Renews the lease every `intervalNanos` of the runtime's clock until
    /// `stopLeaseRenewal()`, or until a renewal finds the node fenced.
    package func startLeaseRenewal(intervalNanos: UInt64) {
        guard links.contains(where: isUsable) else { return }
        let started = leaseRenewal.withLock { running -> Bool in
            defer { running = true }
            return !running
        }
        guard started else { return }
        let runtime = runtime
        spawn { [weak self] in
            while true {
                await runtime.sleep(nanoseconds: intervalNanos)
                guard let self, leaseRenewal.withLock({ $0 }) else { return }
                await renewLeases()
                guard links.contains(where: isUsable) else {
                    leaseRenewal.withLock { $0 = false }
                    return
                }
            }
        }
    }

    /// Stops renewing (the loop ends at its next wake-up, or when the allocator is released).
    package func stopLeaseRenewal() { leaseRenewal.withLock { $0 = false } }

    /// Whether this node found itself fenced (or cut off) on some memory node.
    package var isFenced: Bool { !fencedOn.withLock { $0.isEmpty } }

    /// Whether `link`'s memory node is still in reach for this incarnation: no renewal
    /// found the node fenced there, and no batch of the link failed.
    func isUsable(_ link: MemoryNodeLink) -> Bool {
        !link.isBroken && (fencedCount.load(ordering: .acquiring) == 0 || !fencedOn.withLock { $0.contains(link.memoryNode) })
    }

    func markUnusable(_ link: MemoryNodeLink) {
        fencedOn.withLock { fenced in
            if fenced.insert(link.memoryNode).inserted { fencedCount.wrappingIncrement(ordering: .releasing) }
        }
    }
}
