import FineMem

/// Reads a fuzzer's bytes as a stream of small numbers; past the end it answers zeros, so
/// every input is a valid program.
struct FuzzInput {
    private let bytes: [UInt8]
    private var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var isAtEnd: Bool { position >= bytes.count }

    mutating func byte() -> UInt8 {
        defer { position += 1 }
        return position < bytes.count ? bytes[position] : 0
    }

    mutating func word() -> UInt64 {
        (0..<8).reduce(0) { value, i in value | UInt64(byte()) << (8 * UInt64(i)) }
    }
}

/// Runs a fuzz program in virtual time and answers the violations it found, each with the
/// simulation's seed. The first 8 bytes of `bytes` seed the simulation; the seed's top byte
/// chooses the schedule: as timed (a quarter of the inputs), or PCT-style random node
/// priorities with 1-3 change points. The rest is the program, read by `body`.
func simulateProgram(
    _ bytes: [UInt8], _ body: @escaping @Sendable (inout FuzzInput, Simulator, Failures) async -> Void
) -> [String] {
    var header = FuzzInput(bytes)
    let seed = header.word()
    let changePoints = Int(seed >> 56) % 4
    let simulator = Simulator(
        seed: seed, latency: LatencyModel(), exploration: changePoints == 0 ? .none : .randomPriorities(changePoints: changePoints))
    let program = Array(bytes.dropFirst(8))
    let failures = Failures()
    simulator.spawn {
        var input = FuzzInput(program)
        await body(&input, simulator, failures)
    }
    simulator.run()
    return failures.all.map { "seed \(simulator.seed): \($0)" }
}
