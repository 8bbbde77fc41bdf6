//! The WebAssembly modules the tests and examples run, built from text with
//! `wat`, so that no binary is committed.

/// `add(i32, i32) -> i32`.
pub fn add() -> Vec<u8> {
    parse(
        r#"(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))"#,
    )
}

/// `divide(i32, i32) -> i32`, which traps on a zero divisor.
pub fn divide() -> Vec<u8> {
    parse(
        r#"(module (func (export "divide") (param i32 i32) (result i32) local.get 0 local.get 1 i32.div_s))"#,
    )
}

/// `spin()`, which never returns.
pub fn spin() -> Vec<u8> {
    parse(r#"(module (func (export "spin") (loop (br 0))))"#)
}

/// A WASI command that prints its arguments after the program's name, then
/// every environment entry, separated by spaces, then a newline: `fd_write`,
/// `args_get` and `environ_get`.
pub fn wasi_echo() -> Vec<u8> {
    parse(ECHO)
}

/// `module` with a custom section of `padding` incompressible bytes: still
/// a valid module, now big enough to need several chunks.
pub fn padded(mut module: Vec<u8>, padding: usize) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"padding";
    let mut section = Vec::with_capacity(padding + 16);
    leb128(name.len(), &mut section);
    section.extend_from_slice(name);
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..padding {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        section.push(x as u8);
    }
    module.push(0); // a custom section
    leb128(section.len(), &mut module);
    module.extend_from_slice(&section);
    module
}

fn parse(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("the test module is valid WebAssembly text")
}

const ECHO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 0 argc, 8 environ count, 16 the iovec, 24 bytes written, 32 " \n"
  (data (i32.const 32) " \n")
  (global $any (mut i32) (i32.const 0))
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 16) (local.get $ptr))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))))
  (func $word (param $p i32) (local $n i32)
    (if (global.get $any) (then (call $print (i32.const 32) (i32.const 1))))
    (global.set $any (i32.const 1))
    (block $end (loop $next
      (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $next)))
    (call $print (local.get $p) (local.get $n)))
  (func $words (param $pointers i32) (param $from i32) (param $count i32)
    (block $end (loop $next
      (br_if $end (i32.ge_u (local.get $from) (local.get $count)))
      (call $word (i32.load (i32.add (local.get $pointers) (i32.shl (local.get $from) (i32.const 2)))))
      (local.set $from (i32.add (local.get $from) (i32.const 1)))
      (br $next))))
  (func (export "_start")
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    (call $words (i32.const 1024) (i32.const 1) (i32.load (i32.const 0)))
    (drop (call $environ_sizes_get (i32.const 8) (i32.const 12)))
    (drop (call $environ_get (i32.const 2048) (i32.const 16384)))
    (call $words (i32.const 2048) (i32.const 0) (i32.load (i32.const 8)))
    (call $print (i32.const 33) (i32.const 1))))"#;
