// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "FineMem",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "FineMem", targets: ["FineMem"]),
        .executable(name: "finemem", targets: ["finemem"]),
        .executable(name: "fuzz-allocator", targets: ["AllocatorFuzzer"]),
        .executable(name: "fuzz-layout", targets: ["LayoutFuzzer"]),
        .executable(name: "fuzz-recovery", targets: ["RecoveryFuzzer"]),
        .executable(name: "fuzz-flush", targets: ["FlushFuzzer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
    ],
    targets: [
        // libibverbs through pkg-config; the header adds static-inline wrappers for the
        // function-like macros that do not import into Swift.
        .systemLibrary(
            name: "CVerbs",
            pkgConfig: "libibverbs",
            providers: [.apt(["libibverbs-dev"])]
        ),
        .target(
            name: "FineMem",
            dependencies: [
                "CVerbs",
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: [.enableUpcomingFeature("NonisolatedNonsendingByDefault")]
        ),
        // What exists to test, explore, fuzz, benchmark and demonstrate: workloads, the pool
        // inspector, crash points, exhaustive exploration, the hardware suite, the pair and
        // recovery benchmarks. The tests, the fuzz targets and the tool use it; it is no
        // product, so an application that depends on FineMem never compiles it.
        .target(
            name: "FineMemHarness",
            dependencies: ["FineMem", "CVerbs"],
            swiftSettings: [.enableUpcomingFeature("NonisolatedNonsendingByDefault")]
        ),
        .executableTarget(
            name: "finemem",
            dependencies: [
                "FineMem",
                "FineMemHarness",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "FineMemTests",
            dependencies: [
                "FineMem",
                "FineMemHarness",
                "FuzzTargets",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]
        ),
        // libFuzzer targets: the bodies live in FuzzTargets (the tests replay inputs through
        // them); the executables hand them to LLVMFuzzerRunDriver in -DFUZZING builds.
        .systemLibrary(name: "CFuzzerDriver", path: "Fuzz/CFuzzerDriver"),
        .target(name: "FuzzTargets", dependencies: ["FineMem", "FineMemHarness", "CFuzzerDriver"], path: "Fuzz/FuzzTargets"),
        .executableTarget(name: "AllocatorFuzzer", dependencies: ["FuzzTargets"], path: "Fuzz/AllocatorFuzzer"),
        .executableTarget(name: "LayoutFuzzer", dependencies: ["FuzzTargets"], path: "Fuzz/LayoutFuzzer"),
        .executableTarget(name: "RecoveryFuzzer", dependencies: ["FuzzTargets"], path: "Fuzz/RecoveryFuzzer"),
        .executableTarget(name: "FlushFuzzer", dependencies: ["FuzzTargets"], path: "Fuzz/FlushFuzzer"),
    ],
    swiftLanguageModes: [.v6]
)
