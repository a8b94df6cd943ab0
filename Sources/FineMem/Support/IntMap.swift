/// A hash map from non-negative `Int` keys to values, with open addressing (linear
/// probing, backward-shift deletion) and a multiplicative hash: no `Hasher` (SipHash) per
/// lookup and no heap allocation once its capacity is reached. For small tables on hot
/// paths, such as a compute node's pending logs, looked up several times per operation.
struct IntMap<Value>: Sequence {
    private var keys: [Int]
    private var values: [Value?]
    private(set) var count = 0

    init(capacity: Int = 16) {
        var size = 8
        while size < 2 * capacity { size *= 2 }
        keys = Array(repeating: -1, count: size)
        values = Array(repeating: nil, count: size)
    }

    private var mask: Int { keys.count - 1 }

    @inline(__always)
    private func home(_ key: Int) -> Int { Int(truncatingIfNeeded: (UInt64(key) &* 0x9E37_79B9_7F4A_7C15) >> 32) & mask }

    /// The position of `key`, or of the empty slot where it would go.
    @inline(__always)
    private func position(_ key: Int) -> Int {
        var index = home(key)
        while keys[index] != -1, keys[index] != key { index = (index + 1) & mask }
        return index
    }

    subscript(key: Int) -> Value? {
        get {
            let index = position(key)
            return keys[index] == key ? values[index] : nil
        }
        set {
            precondition(key >= 0, "IntMap keys are non-negative")
            guard let newValue else {
                remove(key)
                return
            }
            let index = position(key)
            if keys[index] == key {
                values[index] = newValue
                return
            }
            if 2 * (count + 1) > keys.count {
                grow()
                self[key] = newValue
                return
            }
            keys[index] = key
            values[index] = newValue
            count += 1
        }
    }

    private mutating func remove(_ key: Int) {
        var hole = position(key)
        guard keys[hole] == key else { return }
        count -= 1
        // Backward shift: move later entries of the probe run into the hole when their
        // home does not lie cyclically in (hole, index].
        var index = (hole + 1) & mask
        while keys[index] != -1 {
            let target = home(keys[index])
            let between = hole <= index ? (hole < target && target <= index) : (hole < target || target <= index)
            if !between {
                keys[hole] = keys[index]
                values[hole] = values[index]
                hole = index
            }
            index = (index + 1) & mask
        }
        keys[hole] = -1
        values[hole] = nil
    }

    private mutating func grow() {
        let old = zip(keys, values)
        var bigger = IntMap(capacity: keys.count)
        for (key, value) in old where key != -1 { bigger[key] = value }
        self = bigger
    }

    /// The entries in slot order: a plain loop over the slots (a lazy chain of zip,
    /// filter and map costs a generic metadata lookup per element in debug builds, where
    /// the pending-log checks run after every operation).
    struct Iterator: IteratorProtocol {
        private let keys: [Int]
        private let values: [Value?]
        private var index = 0

        fileprivate init(keys: [Int], values: [Value?]) {
            self.keys = keys
            self.values = values
        }

        mutating func next() -> (key: Int, value: Value)? {
            while index < keys.count {
                let slot = index
                index += 1
                if keys[slot] != -1 { return (keys[slot], values[slot]!) }
            }
            return nil
        }
    }

    func makeIterator() -> Iterator { Iterator(keys: keys, values: values) }
}

extension IntMap: Sendable where Value: Sendable {}
