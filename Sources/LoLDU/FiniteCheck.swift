/// Throws `notFinite` naming the first NaN or ±Inf among `count` elements (as `name[i]`, or
/// `name[row, col]` when `columns > 1`), optionally copying them to `destination` in the same
/// pass. A large copy is split across the BLAS thread budget: page faults and bandwidth scale
/// with threads.
func checkFinite<T: Element>(
    _ x: UnsafePointer<T>, count: Int, copyingTo destination: UnsafeMutablePointer<T>? = nil,
    name: String, columns: Int = 1
) throws(LoLDUError) {
    let parts = count >= 1 << 22 ? BLASThreads.count : 1
    let finite = UnsafeMutableBufferPointer<Bool>.allocate(capacity: parts)
    defer { finite.deallocate() }
    concurrentForEach(parts) { p in
        // Part p starts at p ⌊count / parts⌋ + min(p, count mod parts): no product can overflow.
        let (share, extra) = count.quotientAndRemainder(dividingBy: parts)
        let start = p * share + Swift.min(p, extra)
        finite[p] = T.allFinite(x + start, count: share + (p < extra ? 1 : 0),
                                copyingTo: destination.map { $0 + start })
    }
    guard finite.allSatisfy({ $0 }) else {
        for j in 0..<count where !T.wide(x[j]).isFinite {
            let at = columns > 1 ? "[\(j / columns), \(j % columns)]" : "[\(j)]"
            throw LoLDUError(.notFinite, "\(name)\(at) is \(T.wide(x[j])); every element must be finite")
        }
        return
    }
}

/// Whether every element of an IEEE array with `Bits`-wide elements is finite, copying it to
/// `destination` in the same pass when given.
///
/// With the sign cleared, a value is NaN or ±Inf exactly when its pattern is at least the
/// infinity pattern, that is when adding the lowest exponent bit carries into the sign bit.
/// OR-ing those sums answers for the whole array with three integer operations per element,
/// which vectorise on any SIMD level; the loop streams at memory bandwidth.
@inline(__always)
func allFiniteBits<Bits: FixedWidthInteger & UnsignedInteger>(
    _ x: UnsafeRawPointer, count: Int, copyingTo destination: UnsafeMutableRawPointer?,
    exponentLowBit: Bits, _: Bits.Type
) -> Bool {
    let source = x.assumingMemoryBound(to: Bits.self)
    let signBit = Bits(1) << (Bits.bitWidth - 1)
    let magnitude = ~signBit
    var carries: Bits = 0
    if let destination {
        let target = destination.assumingMemoryBound(to: Bits.self)
        for i in 0..<count {
            let v = source[i]
            target[i] = v
            carries |= (v & magnitude) &+ exponentLowBit
        }
    } else {
        for i in 0..<count { carries |= (source[i] & magnitude) &+ exponentLowBit }
    }
    return carries & signBit == 0
}

extension Float {
    public static func allFinite(
        _ x: UnsafePointer<Float>, count: Int, copyingTo destination: UnsafeMutablePointer<Float>?
    ) -> Bool {
        allFiniteBits(x, count: count, copyingTo: destination.map { UnsafeMutableRawPointer($0) },
                      exponentLowBit: 1 << 23, UInt32.self)
    }
}

extension Double {
    public static func allFinite(
        _ x: UnsafePointer<Double>, count: Int, copyingTo destination: UnsafeMutablePointer<Double>?
    ) -> Bool {
        allFiniteBits(x, count: count, copyingTo: destination.map { UnsafeMutableRawPointer($0) },
                      exponentLowBit: 1 << 52, UInt64.self)
    }
}
