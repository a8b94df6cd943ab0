/// One compute node's slot in a memory node's node table.
///
/// ```
///  63 59 58               43 42  40 39                                          0
/// +-----+-------------------+------+---------------------------------------------+
/// |00000| incarnation (16)  |state |            heartbeat counter (40)           |
/// +-----+-------------------+------+---------------------------------------------+
/// ```
///
/// States: free, alive, suspected (lease missed), dead (fenced), recovering.
package struct NodeSlot: RawRepresentable, Hashable, Sendable {
    package enum State: UInt64, Sendable, CaseIterable {
        case free = 0, alive = 1, suspected = 2, dead = 3, recovering = 4
    }

    static let heartbeatField = BitField(0, 40)
    static let stateField = BitField(40, 3)
    static let incarnationField = BitField(43, 16)
    static let reservedField = BitField(59, 5)

    package private(set) var rawValue: UInt64

    package init?(rawValue: UInt64) {
        guard Self.reservedField.get(rawValue) == 0, State(rawValue: Self.stateField.get(rawValue)) != nil else { return nil }
        self.rawValue = rawValue
    }

    package static let free = NodeSlot(heartbeat: 0, state: .free, incarnation: 0)

    package init(heartbeat: UInt64, state: State, incarnation: UInt16) {
        var word: UInt64 = 0
        Self.heartbeatField.set(&word, heartbeat & Self.heartbeatField.maxValue)
        Self.stateField.set(&word, state.rawValue)
        Self.incarnationField.set(&word, UInt64(incarnation))
        rawValue = word
    }

    package var heartbeat: UInt64 { Self.heartbeatField.get(rawValue) }
    package var state: State { State(rawValue: Self.stateField.get(rawValue))! }
    package var incarnation: UInt16 { UInt16(Self.incarnationField.get(rawValue)) }

    /// A free slot taken by a (re)starting node, with a new incarnation.
    package func registering() -> NodeSlot? {
        guard state == .free else { return nil }
        return NodeSlot(heartbeat: 0, state: .alive, incarnation: incarnation &+ 1)
    }

    /// One heartbeat of a live node (a suspected node that beats is alive again).
    package func beating() -> NodeSlot? {
        guard state == .alive || state == .suspected else { return nil }
        return NodeSlot(heartbeat: heartbeat &+ 1, state: .alive, incarnation: incarnation)
    }

    package func suspecting() -> NodeSlot? {
        guard state == .alive else { return nil }
        return NodeSlot(heartbeat: heartbeat, state: .suspected, incarnation: incarnation)
    }

    package func declaringDead() -> NodeSlot? {
        guard state == .suspected else { return nil }
        return NodeSlot(heartbeat: heartbeat, state: .dead, incarnation: incarnation)
    }

    package func recovering() -> NodeSlot? {
        guard state == .dead || state == .recovering else { return nil }
        return NodeSlot(heartbeat: heartbeat, state: .recovering, incarnation: incarnation)
    }

    package func recovered() -> NodeSlot? {
        guard state == .recovering else { return nil }
        return NodeSlot(heartbeat: 0, state: .free, incarnation: incarnation)
    }
}
