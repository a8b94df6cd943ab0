/// What a lease monitor did about one compute node.
package enum LeaseEvent: Sendable, Hashable {
    /// The node missed a renewal: its slot is now `suspected`.
    case suspected(OwnerID)
    /// The node missed `missedRenewalsMax` renewals: fenced, then recovered.
    case recovered(OwnerID, RecoveryReport)
    /// Fencing or recovery failed; the next check tries again.
    case failed(OwnerID, MemoryNodeError)
}

/// The failure detector of one memory node: reads its node table through the loopback
/// every interval of the runtime's clock (virtual time under the simulator), marks a node
/// whose heartbeat did not advance `suspected`, and after `missedRenewalsMax` intervals
/// without an advance fences it and recovers it. A slot left `dead` or `recovering` (a
/// recovery that failed, or a fence without one) is recovered at the next check. Checks
/// run one at a time, so one recovery of a node runs at a time.
///
/// ```swift
/// let monitor = LeaseMonitor(memoryNode: node, intervalNanos: 1_000_000_000, missedRenewalsMax: 3, runtime: runtime)
/// monitor.start()
/// ```
package final class LeaseMonitor: Sendable {
    package let memoryNode: MemoryNode
    package let intervalNanos: UInt64
    package let missedRenewalsMax: Int
    private let runtime: any Runtime
    private struct Seen: Sendable {
        var word: UInt64
        var missed: Int
    }
    private let seen = Locked<[OwnerID: Seen]>([:])
    private let running = Locked(false)
    private let checking = Locked(false)
    private let eventLog = Locked<[LeaseEvent]>([])

    package init(memoryNode: MemoryNode, intervalNanos: UInt64, missedRenewalsMax: Int, runtime: any Runtime) {
        precondition(intervalNanos > 0 && missedRenewalsMax >= 1, "a lease needs an interval and at least one renewal")
        self.memoryNode = memoryNode
        self.intervalNanos = intervalNanos
        self.missedRenewalsMax = missedRenewalsMax
        self.runtime = runtime
    }

    /// Everything the monitor did so far, in order.
    package var events: [LeaseEvent] { eventLog.withLock { $0 } }

    /// One check of every slot. Answers what it did.
    @discardableResult
    package func check() async -> [LeaseEvent] {
        guard checking.withLock({ busy in defer { busy = true }; return !busy }) else { return [] }
        defer { checking.withLock { $0 = false } }
        let words: [UInt64]
        do { words = try await memoryNode.readNodeTable() } catch { return [] }
        var events: [LeaseEvent] = []
        var expired: [(owner: OwnerID, incarnation: UInt16)] = []
        var unrecovered: [OwnerID] = []
        for (index, word) in words.enumerated() {
            let owner = OwnerID(UInt16(index))
            guard let slot = NodeSlot(rawValue: word) else { continue }
            switch slot.state {
            case .free:
                seen.withLock { $0[owner] = nil }
            case .dead, .recovering:
                unrecovered.append(owner)
            case .alive, .suspected:
                let missed = seen.withLock { seen -> Int in
                    var entry = seen[owner] ?? Seen(word: word, missed: -1)
                    let advanced = entry.word & Self.progressMask != word & Self.progressMask
                    entry.missed = advanced || entry.missed < 0 ? 0 : entry.missed + 1
                    entry.word = word
                    seen[owner] = entry
                    return entry.missed
                }
                if missed >= missedRenewalsMax {
                    expired.append((owner, slot.incarnation))
                } else if missed >= 1, slot.state == .alive {
                    if (try? await memoryNode.markSuspected(owner, known: word)) == true { events.append(.suspected(owner)) }
                }
            }
        }
        // Every expired node is fenced before any recovery starts: nodes that died together
        // may hold each other's headers (one's recovery waits on the other's pending log).
        // A fence applies to the incarnation that missed its renewals, not to one that
        // took the slot since.
        for (owner, incarnation) in expired {
            do {
                if try await memoryNode.fenceExpired(computeNode: owner, incarnation: incarnation) {
                    unrecovered.append(owner)
                } else {
                    seen.withLock { $0[owner] = nil }
                }
            } catch {
                events.append(.failed(owner, error))
            }
        }
        for owner in unrecovered.sorted(by: { $0.rawValue < $1.rawValue }) {
            do {
                let report = try await memoryNode.recover(computeNode: owner, runtime: runtime)
                seen.withLock { $0[owner] = nil }
                events.append(.recovered(owner, report))
            } catch {
                // Blocked by a node recovered later in this check, or by a stalled one:
                // the next check runs it again.
                events.append(.failed(owner, error))
            }
        }
        eventLog.withLock { $0 += events }
        return events
    }

    /// The heartbeat and incarnation of a slot word: what must advance (a state change
    /// to or from `suspected` alone is not a renewal).
    private static let progressMask: UInt64 = ~(UInt64(7) << 40)

    /// Checks every interval until `stop()`.
    package func start() {
        guard running.withLock({ value in defer { value = true }; return !value }) else { return }
        let (interval, runtime) = (intervalNanos, runtime)
        runtime.spawn { [weak self] in
            while true {
                await runtime.sleep(nanoseconds: interval)
                guard let self, running.withLock({ $0 }) else { return }
                await check()
            }
        }
    }

    /// Stops checking (the loop ends at its next wake-up, or when the monitor is released).
    package func stop() { running.withLock { $0 = false } }
}
