/// Faults injected into a simulation: crashes of compute nodes (at a virtual time, or
/// after a number of executed verbs, which can fall inside a batch), stalls, and broken
/// connections (`SimulatedConnection.breakConnection()`, or the memory node breaking a
/// protection domain's). A crashed node's effects up to the crash stay in memory and it
/// posts nothing afterwards, but the verbs it had posted and that had not executed may
/// still execute later, as work requests on a NIC outlive their host: on each of its
/// connections a seeded prefix of them runs late and the rest is dropped (see
/// `SimulatedConnection`); fencing the node (breaking its connections) stops them. A
/// crashed memory node answers every verb with `peerDead`.
package final class FaultPlan: @unchecked Sendable {
    /// How many of a crashed node's posted, unexecuted verbs still execute, on each of its
    /// connections.
    package enum LateVerbs: Sendable, Hashable, CaseIterable {
        /// A seeded number of them, the first ones (the default).
        case seeded
        /// None: they are dropped.
        case none
        /// All of them, at the NIC's pace after the crash (until the node is fenced).
        case all
    }

    private var crashAfterVerbs: [NodeID: UInt64] = [:]
    private var lateVerbs: [NodeID: LateVerbs] = [:]
    private var crashAt: [NodeID: UInt64] = [:]
    private var crashedNodes: Set<NodeID> = []
    private var crashTimes: [NodeID: UInt64] = [:]
    private var stalls: [NodeID: [(start: UInt64, end: UInt64)]] = [:]
    /// Whether a crash was ever planned, and a stall: without them, the checks before
    /// every verb, post and completion answer at once.
    private var crashesPlanned = false
    private var stallsPlanned = false

    /// Crashes `node` once it has had `count` verbs executed in total: a crash between two
    /// verbs, possibly in the middle of a batch.
    package func crash(_ node: NodeID, afterVerbs count: UInt64, late: LateVerbs = .seeded) {
        crashAfterVerbs[node] = count
        lateVerbs[node] = late
        crashesPlanned = true
    }

    /// How `node`'s unexecuted verbs fare once it crashed.
    package func lateVerbs(of node: NodeID) -> LateVerbs { lateVerbs[node] ?? .seeded }

    /// Crashes `node` at virtual time `time`. Its verbs that would execute later do so
    /// only as late verbs (see the type's summary): nobody awaits them, and fencing the
    /// node stops them.
    package func crash(_ node: NodeID, atNanoseconds time: UInt64) {
        crashAt[node] = time
        crashesPlanned = true
    }

    /// Freezes `node`'s CPU during `[start, start+duration)`: it posts nothing and receives
    /// no completion until the stall ends. Verbs already on the wire still execute.
    package func stall(_ node: NodeID, fromNanoseconds start: UInt64, forNanoseconds duration: UInt64) {
        stalls[node, default: []].append((start, start + duration))
        stallsPlanned = true
    }

    /// Brings a crashed `node` back (a restarted host, with new connections): its planned
    /// crashes are forgotten. Connections it had stay as the crash left them.
    package func revive(_ node: NodeID) {
        crashedNodes.remove(node)
        crashAfterVerbs[node] = nil
        crashAt[node] = nil
        lateVerbs[node] = nil
    }

    /// Whether `node` has been found crashed (by a verb, post or completion of its own).
    package func isCrashed(_ node: NodeID) -> Bool { crashesPlanned && crashedNodes.contains(node) }

    /// The virtual time of `node`'s crash, once found: the planned time of a crash at a
    /// time, or when the verb after its last one came up for a crash after verbs.
    package func crashTime(of node: NodeID) -> UInt64? { crashTimes[node] }

    /// Decides, just before a verb of `node` executes at `now`, whether the node has crashed.
    func crashesBeforeNextVerb(_ node: NodeID, executedSoFar: UInt64, now: UInt64) -> Bool {
        guard crashesPlanned else { return false }
        if crashedNodes.contains(node) { return true }
        if let limit = crashAfterVerbs[node], executedSoFar >= limit { markCrashed(node, at: now); return true }
        if let time = crashAt[node], now >= time { markCrashed(node, at: time); return true }
        return false
    }

    /// Whether `node` is crashed at `now` (for posts and completions).
    func isCrashed(_ node: NodeID, now: UInt64) -> Bool {
        guard crashesPlanned else { return false }
        if !crashedNodes.contains(node), let time = crashAt[node], now >= time { markCrashed(node, at: time) }
        return crashedNodes.contains(node)
    }

    private func markCrashed(_ node: NodeID, at time: UInt64) {
        crashedNodes.insert(node)
        crashTimes[node] = time
    }

    /// The earliest time at or after `time` when `node` is not stalled.
    func unstalled(_ node: NodeID, at time: UInt64) -> UInt64 {
        guard stallsPlanned else { return time }
        var clear = time
        var moved = true
        while moved {
            moved = false
            for stall in stalls[node] ?? [] where clear >= stall.start && clear < stall.end {
                clear = stall.end
                moved = true
            }
        }
        return clear
    }
}
