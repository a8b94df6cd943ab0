/// The time a simulated NIC takes for each part of a verb, in nanoseconds.
///
/// A batch leaves the compute node, crosses the network (`oneWayNanos`), and its verbs
/// execute one at a time, in the order of its queue pair (see `SimulatedConnection`), at
/// the memory node's NIC: each occupies the NIC for its service time plus its payload over
/// the bandwidth; atomics also occupy the NIC's single atomic unit, so concurrent atomics
/// from all connections serialise there. The completions cross back (`oneWayNanos`
/// again). A fenced verb waits for the answers of earlier READs and atomics to cross back
/// and then crosses itself: two more crossings. `jitterFraction` adds seeded noise to each
/// crossing.
///
/// The defaults follow the paper's ConnectX-6 testbed: about 1.7 us one way with the
/// software stack (a 4 KiB allocation with one extra READ or CAS costs about 4 us more,
/// PAPER-NUMBERS.md, factor analysis), 100 Gb/s (12.5 bytes per ns), and an atomic unit
/// that retires about 33 M atomics per second (30 ns each): 512 threads allocating at
/// 43 us each is about 12 M allocations per second, with at least two atomics each, so the
/// memory node's NIC must sustain at least 24 M atomics per second.
package struct LatencyModel: Sendable, Hashable {
    package var oneWayNanos: UInt64 = 1_700
    package var readServiceNanos: UInt64 = 60
    package var writeServiceNanos: UInt64 = 60
    package var atomicServiceNanos: UInt64 = 30
    package var bytesPerNanosecond: Double = 12.5
    package var jitterFraction: Double = 0.1

    package init() {}

    package func serviceNanos(_ verb: Verb) -> UInt64 {
        let base: UInt64 = switch verb.kind {
        case .read: readServiceNanos
        case .write: writeServiceNanos
        case .compareAndSwap, .fetchAndAdd: atomicServiceNanos
        }
        return base + UInt64(Double(verb.payloadBytes) / bytesPerNanosecond)
    }
}
