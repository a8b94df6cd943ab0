/// Leases: a compute node proves it is alive by advancing the heartbeat of its slot in
/// every memory node's node table, one CAS per memory node per interval. A memory node's
/// monitor that sees no advance for a number of intervals fences the node and recovers
/// it. The renewal that finds its slot no longer alive (or of another incarnation) learns
/// it was fenced: from then on every operation of this allocator fails with `fenced`,
/// whatever its clocks say; the node comes back only by starting anew.
extension BlockAllocator {
    /// Renews the lease on every memory node (one doorbell each). Answers the memory
    /// nodes on which the node found itself fenced: its slot no longer this incarnation's
    /// alive one, or its connection broken or its key unknown (what fencing does to it). A
    /// memory node that does not answer (dead, or unreachable) is not a fence: the lease
    /// there simply is not renewed. Fenced anywhere, the node is fenced everywhere: every
    /// operation fails from then on, and the renewal loop stops, so that every memory node
    /// fences and recovers it in turn (fail-stop: a node half fenced would keep blocks on
    /// the memory nodes that still see it alive, with nobody to free them).
    @discardableResult
    package func renewLeases() async -> [NodeID] {
        var lost: [NodeID] = []
        for link in links {
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
                switch error {
                case .connectionBroken, .remoteAccess(.unknownKey, _, _, _), .remoteAccess(.staleKey, _, _, _): lost.append(link.memoryNode)
                case .remoteAccess, .peerDead, .localCrash, .localNIC: break
                }
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
        if !lost.isEmpty {
            fencedOn.withLock { $0.formUnion(lost) }
            stopLeaseRenewal()
        }
        return lost
    }

    /// Renews the lease every `intervalNanos` of the runtime's clock until
    /// `stopLeaseRenewal()`, or until a renewal finds the node fenced.
    package func startLeaseRenewal(intervalNanos: UInt64) {
        guard !isFenced else { return }
        let started = leaseRenewal.withLock { running -> Bool in
            defer { running = true }
            return !running
        }
        guard started else { return }
        let runtime = runtime
        runtime.spawn { [weak self] in
            while true {
                await runtime.sleep(nanoseconds: intervalNanos)
                guard let self, leaseRenewal.withLock({ $0 }) else { return }
                await renewLeases()
            }
        }
    }

    /// Stops renewing (the loop ends at its next wake-up, or when the allocator is released).
    package func stopLeaseRenewal() { leaseRenewal.withLock { $0 = false } }

    /// The grant and connection of each memory node: the metadata access a live node
    /// lends to recovery (`PoolRecovery` runs through any connection with it).
    package var metadataAccess: [(grant: MemoryNodeGrant, connection: any FabricConnection)] { links.map { ($0.grant, $0.connection) } }

    /// Whether a renewal found this node fenced on some memory node.
    package var isFenced: Bool { !fencedOn.withLock { $0.isEmpty } }

    /// Fails when a renewal found this node fenced: a fenced node changes nothing.
    func checkNotFenced() throws(AllocationError) {
        if let node = fencedOn.withLock({ $0.min() }) { throw .fenced(memoryNode: node) }
    }
}
