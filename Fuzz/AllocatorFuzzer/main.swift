// The allocator fuzz target (see FuzzTargets.allocatorFindings for the input format).
import FuzzTargets

runFuzzer(name: "fuzz-allocator", fuzzAllocator)
