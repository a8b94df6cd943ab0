/// Faults injected into a simulation: crashes of compute nodes (at a virtual time, or
/// after a number of executed verbs, which can fall inside a batch), stalls, and broken
/// connections. A crashed node's effects up to the crash stay in memory; nothing it posts
/// afterwards executes. A crashed memory node answers every verb with `peerDead`.
package final class FaultPlan: @unchecked Sendable {
    private var crashAfterVerbs: [NodeID: UInt64] = [:]
    private var crashAt: [NodeID: UInt64] = [:]
    private var crashedNodes: Set<NodeID> = []
    private var stalls: [NodeID: [(start: UInt64, end: UInt64)]] = [:]

    /// Crashes `node` once it has had `count` verbs executed in total: a crash between two
    /// verbs, possibly in the middle of a batch.
    package func crash(_ node: NodeID, afterVerbs count: UInt64) { crashAfterVerbs[node] = count }

    /// Crashes `node` at virtual time `time`; verbs that would execute later do not.
    package func crash(_ node: NodeID, atNanoseconds time: UInt64) { crashAt[node] = time }

    /// Freezes `node`'s CPU during `[start, start+duration)`: it posts nothing and receives
    /// no completion until the stall ends. Verbs already on the wire still execute.
    package func stall(_ node: NodeID, fromNanoseconds start: UInt64, forNanoseconds duration: UInt64) {
        stalls[node, default: []].append((start, start + duration))
    }

    package func isCrashed(_ node: NodeID) -> Bool { crashedNodes.contains(node) }

    /// Decides, just before a verb of `node` executes at `now`, whether the node has crashed.
    func crashesBeforeNextVerb(_ node: NodeID, executedSoFar: UInt64, now: UInt64) -> Bool {
        if crashedNodes.contains(node) { return true }
        if let limit = crashAfterVerbs[node], executedSoFar >= limit { crashedNodes.insert(node); return true }
        if let time = crashAt[node], now >= time { crashedNodes.insert(node); return true }
        return false
    }

    /// Whether `node` is crashed at `now` (for posts and completions).
    func isCrashed(_ node: NodeID, now: UInt64) -> Bool {
        if let time = crashAt[node], now >= time { crashedNodes.insert(node) }
        return crashedNodes.contains(node)
    }

    /// The earliest time at or after `time` when `node` is not stalled.
    func unstalled(_ node: NodeID, at time: UInt64) -> UInt64 {
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
