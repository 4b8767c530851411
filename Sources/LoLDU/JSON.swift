/// A JSON value, with a parser that treats its input as hostile and a writer.
///
/// The parser is strict RFC 8259 (NaN and Infinity only when asked for, as Python writes them):
/// no trailing commas, comments, or leading zeros; strings
/// must be valid UTF-8 without raw control characters; duplicate object keys are an error;
/// nesting is limited to ``maxDepth``. Numbers keep their text, so integers are read exactly.
public enum JSON: Equatable, Sendable {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSON])
    case object([String: JSON])

    static let maxDepth = 64

    public subscript(key: String) -> JSON? {
        if case .object(let members) = self { return members[key] }
        return nil
    }

    public var string: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var bool: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    /// The value as an exact integer, if it is a number written without fraction or exponent.
    public var int: Int? {
        if case .number(let text) = self, !text.contains(where: { $0 == "." || $0 == "e" || $0 == "E" }) {
            return Int(text)
        }
        return nil
    }

    public var double: Double? {
        if case .number(let text) = self { return Double(text) }
        return nil
    }

    public var array: [JSON]? {
        if case .array(let items) = self { return items }
        return nil
    }

    public var object: [String: JSON]? {
        if case .object(let members) = self { return members }
        return nil
    }

    // MARK: Writing

    /// Compact JSON text; object members in the given order.
    public static func text(_ members: [(String, JSON)]) -> String {
        "{" + members.map { quote($0.0) + ":" + $0.1.text }.joined(separator: ",") + "}"
    }

    public var text: String {
        switch self {
        case .null: "null"
        case .bool(let b): b ? "true" : "false"
        case .number(let n): n
        case .string(let s): JSON.quote(s)
        case .array(let items): "[" + items.map(\.text).joined(separator: ",") + "]"
        case .object(let members): JSON.text(members.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
        }
    }

    /// Text with object members sorted and two spaces per level, as Python's
    /// `json.dumps(value, indent=2, sort_keys=True)` writes it (what PEFT and transformers write).
    public func pretty(_ level: Int = 0) -> String {
        let inner = String(repeating: " ", count: 2 * (level + 1)), outer = String(repeating: " ", count: 2 * level)
        switch self {
        case .array(let items) where !items.isEmpty:
            return "[\n" + items.map { inner + $0.pretty(level + 1) }.joined(separator: ",\n") + "\n\(outer)]"
        case .object(let members) where !members.isEmpty:
            return "{\n" + members.sorted { $0.key < $1.key }
                .map { inner + JSON.quote($0.key) + ": " + $0.value.pretty(level + 1) }
                .joined(separator: ",\n") + "\n\(outer)}"
        default:
            return text
        }
    }

    public static func number(_ value: Int) -> JSON { .number(String(value)) }

    /// A double, written so that it reads back exactly; `null` if it is not finite (JSON has no
    /// infinities or NaN).
    public static func number(_ value: Double) -> JSON { value.isFinite ? .number(value.description) : .null }

    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    // MARK: Parsing

    /// Parses `bytes` as one JSON value; `what` names the input in error messages. `nonFinite`
    /// also accepts Python's extension, the numbers `NaN`, `Infinity` and `-Infinity` (which
    /// `json.dumps` writes, and so transformers' `config.json` may hold), kept as that text.
    public static func parse(_ bytes: UnsafeRawBufferPointer, what: String, nonFinite: Bool = false) throws(LoLDUError) -> JSON {
        // The values take up to about 20 times the text (`[0,0,…]`: an enum per 2 bytes, arrays
        // that grow by doubling): room for them is checked first.
        try ensureRoom(bytes.count, bytesEach: 32)
        var parser = Parser(bytes: bytes, what: what, nonFinite: nonFinite)
        parser.skipSpace()
        let value = try parser.value(depth: 0)
        parser.skipSpace()
        guard parser.at == bytes.count else { throw parser.fail("unexpected text after the JSON value") }
        return value
    }

    public static func parse(_ text: String, what: String) throws(LoLDUError) -> JSON {
        var copy = text
        return try rethrowing { try copy.withUTF8 { buffer in try parse(UnsafeRawBufferPointer(buffer), what: what) } }
    }

    private struct Parser {
        let bytes: UnsafeRawBufferPointer
        let what: String
        let nonFinite: Bool
        var at = 0

        func fail(_ message: String) -> LoLDUError {
            LoLDUError(.format, "\(what): invalid JSON at byte \(at): \(message)")
        }

        var current: UInt8? { at < bytes.count ? bytes[at] : nil }

        mutating func skipSpace() {
            while let c = current, c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09 { at += 1 }
        }

        mutating func expect(_ literal: StaticString, _ value: JSON) throws(LoLDUError) -> JSON {
            let count = literal.utf8CodeUnitCount
            guard at + count <= bytes.count else { throw fail("truncated") }
            for i in 0..<count where bytes[at + i] != literal.utf8Start[i] { throw fail("unexpected character") }
            at += count
            return value
        }

        mutating func value(depth: Int) throws(LoLDUError) -> JSON {
            guard depth < JSON.maxDepth else { throw fail("nesting deeper than \(JSON.maxDepth)") }
            guard let c = current else { throw fail("truncated") }
            switch c {
            case UInt8(ascii: "{"): return try object(depth: depth)
            case UInt8(ascii: "["): return try array(depth: depth)
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): return try expect("true", .bool(true))
            case UInt8(ascii: "f"): return try expect("false", .bool(false))
            case UInt8(ascii: "n"): return try expect("null", .null)
            case UInt8(ascii: "N") where nonFinite: return try expect("NaN", .number("NaN"))
            case UInt8(ascii: "I") where nonFinite: return try expect("Infinity", .number("Infinity"))
            case UInt8(ascii: "-") where nonFinite && at + 1 < bytes.count && bytes[at + 1] == UInt8(ascii: "I"):
                return try expect("-Infinity", .number("-Infinity"))
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
            default: throw fail("unexpected character")
            }
        }

        mutating func object(depth: Int) throws(LoLDUError) -> JSON {
            at += 1
            var members: [String: JSON] = [:]
            skipSpace()
            if current == UInt8(ascii: "}") { at += 1; return .object(members) }
            while true {
                skipSpace()
                guard current == UInt8(ascii: "\"") else { throw fail("expected a string key") }
                let key = try string()
                skipSpace()
                guard current == UInt8(ascii: ":") else { throw fail("expected ':'") }
                at += 1
                skipSpace()
                let item = try value(depth: depth + 1)
                guard members.updateValue(item, forKey: key) == nil else { throw fail("duplicate key \"\(key)\"") }
                skipSpace()
                guard let c = current else { throw fail("truncated") }
                at += 1
                if c == UInt8(ascii: "}") { return .object(members) }
                guard c == UInt8(ascii: ",") else { throw fail("expected ',' or '}'") }
            }
        }

        mutating func array(depth: Int) throws(LoLDUError) -> JSON {
            at += 1
            var items: [JSON] = []
            skipSpace()
            if current == UInt8(ascii: "]") { at += 1; return .array(items) }
            while true {
                skipSpace()
                items.append(try value(depth: depth + 1))
                skipSpace()
                guard let c = current else { throw fail("truncated") }
                at += 1
                if c == UInt8(ascii: "]") { return .array(items) }
                guard c == UInt8(ascii: ",") else { throw fail("expected ',' or ']'") }
            }
        }

        mutating func number() throws(LoLDUError) -> JSON {
            let start = at
            func digits(_ p: inout Parser) -> Int {
                var n = 0
                while let c = p.current, c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") { p.at += 1; n += 1 }
                return n
            }
            if current == UInt8(ascii: "-") { at += 1 }
            if current == UInt8(ascii: "0") {
                at += 1
            } else if digits(&self) == 0 {
                throw fail("expected a digit")
            }
            if current == UInt8(ascii: ".") {
                at += 1
                guard digits(&self) > 0 else { throw fail("expected a digit after '.'") }
            }
            if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
                at += 1
                if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { at += 1 }
                guard digits(&self) > 0 else { throw fail("expected a digit in the exponent") }
            }
            return .number(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<at]), as: UTF8.self))
        }

        mutating func hex4() throws(LoLDUError) -> UInt32 {
            guard at + 4 <= bytes.count else { throw fail("truncated \\u escape") }
            var value: UInt32 = 0
            for _ in 0..<4 {
                let c = bytes[at]
                let digit: UInt8
                switch c {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = c - UInt8(ascii: "0")
                case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = c - UInt8(ascii: "a") + 10
                case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = c - UInt8(ascii: "A") + 10
                default: throw fail("bad \\u escape")
                }
                value = value * 16 + UInt32(digit)
                at += 1
            }
            return value
        }

        mutating func string() throws(LoLDUError) -> String {
            at += 1
            var utf8: [UInt8] = []
            while true {
                guard let c = current else { throw fail("unterminated string") }
                at += 1
                switch c {
                case UInt8(ascii: "\""):
                    guard let s = String(validating: utf8, as: UTF8.self) else { throw fail("string is not valid UTF-8") }
                    return s
                case UInt8(ascii: "\\"):
                    guard let e = current else { throw fail("unterminated string") }
                    at += 1
                    switch e {
                    case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): utf8.append(e)
                    case UInt8(ascii: "b"): utf8.append(0x08)
                    case UInt8(ascii: "f"): utf8.append(0x0C)
                    case UInt8(ascii: "n"): utf8.append(0x0A)
                    case UInt8(ascii: "r"): utf8.append(0x0D)
                    case UInt8(ascii: "t"): utf8.append(0x09)
                    case UInt8(ascii: "u"):
                        var code = try hex4()
                        if code >= 0xD800 && code < 0xDC00 {
                            guard at + 2 <= bytes.count, bytes[at] == UInt8(ascii: "\\"), bytes[at + 1] == UInt8(ascii: "u") else {
                                throw fail("unpaired surrogate")
                            }
                            at += 2
                            let low = try hex4()
                            guard low >= 0xDC00 && low < 0xE000 else { throw fail("unpaired surrogate") }
                            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        }
                        guard let scalar = Unicode.Scalar(code) else { throw fail("unpaired surrogate") }
                        utf8.append(contentsOf: Array(String(Character(scalar)).utf8))
                    default: throw fail("bad escape")
                    }
                default:
                    guard c >= 0x20 else { throw fail("control character in string") }
                    utf8.append(c)
                }
            }
        }
    }
}

extension String {
    /// Whether the string holds a control character (U+0000–U+001F, U+007F–U+009F), as a JSON string
    /// may through escapes: refused in names that become paths, keys or C strings.
    var containsControlCharacter: Bool { unicodeScalars.contains { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) } }
}
