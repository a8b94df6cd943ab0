// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "FineMem",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "FineMem", targets: ["FineMem"]),
        .executable(name: "finemem", targets: ["finemem"]),
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
            ]
        ),
        .executableTarget(
            name: "finemem",
            dependencies: [
                "FineMem",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "FineMemTests",
            dependencies: [
                "FineMem",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
