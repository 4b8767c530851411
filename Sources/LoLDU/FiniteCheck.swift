/// `max |x_i|` over `count` elements, optionally copying them to `destination` in the same pass; throws
/// `notFinite` naming the first NaN or ±Inf (as `name[i]`, or `name[row, col]` when
/// `columns > 1`).
///
/// For finite IEEE values, the order of `|x|` is the order of the bit patterns with the sign
/// cleared, and every NaN or ±Inf pattern is at least the infinity pattern: one unsigned-integer
/// maximum (which vectorises) answers both questions in a single streaming pass.
func checkedMaxAbs<T: BLASScalar>(
    _ x: UnsafePointer<T>, count: Int, copyingTo destination: UnsafeMutablePointer<T>? = nil,
    name: String, columns: Int = 1
) throws(LoLDUError) -> T {
    // A large copy runs on the BLAS thread budget: page faults and bandwidth scale with it.
    let parts = destination != nil && count >= 1 << 22 ? BLASThreads.count : 1
    let partial = UnsafeMutableBufferPointer<(T, finite: Bool)>.allocate(capacity: parts)
    defer { partial.deallocate() }
    concurrentForEach(parts) { p in
        let start = count * p / parts
        partial[p] = T.maxMagnitude(x + start, count: count * (p + 1) / parts - start,
                                    copyingTo: destination.map { $0 + start })
    }
    let maxAbs = partial.reduce(T.zero) { Swift.max($0, $1.0) }
    if !partial.allSatisfy(\.finite) {
        for j in 0..<count where !x[j].isFinite {
            let at = columns > 1 ? "[\(j / columns), \(j % columns)]" : "[\(j)]"
            throw LoLDUError(.notFinite, "\(name)\(at) is \(x[j]); every element must be finite")
        }
    }
    return maxAbs
}

/// The bit-pattern maximum of `|x_i|` over an array of `Bits`, copying it to `destination`
/// in the same pass when given.
@inline(__always)
private func maxMagnitudeBits<Bits: FixedWidthInteger & UnsignedInteger>(
    _ x: UnsafeRawPointer, count: Int, copyingTo destination: UnsafeMutableRawPointer?, _: Bits.Type
) -> Bits {
    let source = x.assumingMemoryBound(to: Bits.self)
    let signMask = ~(Bits(1) << (Bits.bitWidth - 1))
    var high: Bits = 0
    if let destination {
        let target = destination.assumingMemoryBound(to: Bits.self)
        for i in 0..<count {
            let v = source[i]
            target[i] = v
            high = Swift.max(high, v & signMask)
        }
    } else {
        for i in 0..<count { high = Swift.max(high, source[i] & signMask) }
    }
    return high
}

extension Float {
    public static func maxMagnitude(
        _ x: UnsafePointer<Float>, count: Int, copyingTo destination: UnsafeMutablePointer<Float>?
    ) -> (Float, finite: Bool) {
        let high = maxMagnitudeBits(x, count: count, copyingTo: destination.map { UnsafeMutableRawPointer($0) }, UInt32.self)
        return (Float(bitPattern: high), high < Float.infinity.bitPattern)
    }
}

extension Double {
    public static func maxMagnitude(
        _ x: UnsafePointer<Double>, count: Int, copyingTo destination: UnsafeMutablePointer<Double>?
    ) -> (Double, finite: Bool) {
        let high = maxMagnitudeBits(x, count: count, copyingTo: destination.map { UnsafeMutableRawPointer($0) }, UInt64.self)
        return (Double(bitPattern: high), high < Double.infinity.bitPattern)
    }
}
