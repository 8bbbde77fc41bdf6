//! Runs one exported function of a WebAssembly module in wasmi, bounded in
//! time and memory, and stoppable. No WASI and no host functions: upstream's
//! tasks are pure functions of integer inputs.

use std::time::{Duration, Instant};

use serde_json::Value;
use wasmi::{
    Config, Engine, Linker, Module, ResumableCall, Store, StoreLimits, StoreLimitsBuilder, Val,
    ValType,
};

/// Fuel per slice: roughly one unit per instruction, so a few milliseconds of
/// work between checks of the deadline and the stop flag.
const FUEL_SLICE: u64 = 5_000_000;

/// What a task may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time for the call.
    pub timeout: Duration,
    /// Linear memory, in bytes.
    pub max_memory: usize,
}

/// Runs `name` from `module` with `inputs`, returning its results as JSON: a
/// number, an array of them, or null. Checks `stopped` between fuel slices.
///
/// # Errors
///
/// One line that says what went wrong: the module does not load, lacks
/// `name`, needs imports, gets the wrong inputs, traps, runs out of time, or
/// was stopped.
pub fn run(
    module: &[u8],
    name: &str,
    inputs: &[Value],
    limits: Limits,
    stopped: impl Fn() -> bool,
) -> Result<Value, String> {
    let deadline = Instant::now() + limits.timeout;
    let mut config = Config::default();
    config.consume_fuel(true);
    let engine = Engine::new(&config);
    let module =
        Module::new(&engine, module).map_err(|e| format!("the module does not load: {e}"))?;
    if let Some(import) = module.imports().next() {
        return Err(format!(
            "the module imports {}::{}, which this proplet does not provide: it runs modules without WASI or host functions",
            import.module(),
            import.name()
        ));
    }
    let limiter = StoreLimitsBuilder::new()
        .memory_size(limits.max_memory)
        .build();
    let mut store: Store<StoreLimits> = Store::new(&engine, limiter);
    store.limiter(|limits| limits);
    store.set_fuel(FUEL_SLICE).map_err(|e| e.to_string())?;
    let instance = Linker::<StoreLimits>::new(&engine)
        .instantiate_and_start(&mut store, &module)
        .map_err(|e| format!("the module does not start: {e}"))?;
    let func = instance
        .get_func(&store, name)
        .ok_or_else(|| format!("the module exports no function {name:?}"))?;
    let ty = func.ty(&store);
    if ty.params().len() != inputs.len() {
        return Err(format!(
            "{name} takes {} arguments, the task gives {}",
            ty.params().len(),
            inputs.len()
        ));
    }
    let args = ty
        .params()
        .iter()
        .zip(inputs)
        .enumerate()
        .map(|(i, (ty, input))| argument(*ty, input).map_err(|e| format!("input {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut outputs: Vec<Val> = ty
        .results()
        .iter()
        .map(|ty| Val::default_for_ty(*ty))
        .collect();

    let mut call = func.call_resumable(&mut store, &args, &mut outputs);
    loop {
        match call {
            Ok(ResumableCall::Finished) => break,
            Ok(ResumableCall::OutOfFuel(paused)) => {
                if stopped() {
                    return Err("stopped by the manager".to_owned());
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "timed out after {:?} (PROPLET_TASK_TIMEOUT)",
                        limits.timeout
                    ));
                }
                store
                    .set_fuel(FUEL_SLICE.max(paused.required_fuel()))
                    .map_err(|e| e.to_string())?;
                call = paused.resume(&mut store, &mut outputs);
            }
            Ok(ResumableCall::HostTrap(_)) => {
                return Err("the module called a host function, and there are none".to_owned())
            }
            Err(error) => return Err(format!("the module trapped: {error}")),
        }
    }
    let mut results: Vec<Value> = outputs.iter().map(result).collect();
    Ok(match results.len() {
        0 => Value::Null,
        1 => results.remove(0),
        _ => Value::Array(results),
    })
}

/// A JSON input as the parameter type wants it; unsigned inputs above the
/// signed range wrap, as upstream's u64 inputs do.
fn argument(ty: ValType, input: &Value) -> Result<Val, String> {
    let Value::Number(number) = input else {
        return Err(format!("{input} is not a number"));
    };
    let integer = number
        .as_i64()
        .or_else(|| number.as_u64().map(|n| n as i64));
    Ok(match (ty, integer) {
        (ValType::I32, Some(n)) => Val::I32(
            i32::try_from(n)
                .or_else(|_| u32::try_from(n).map(|n| n as i32))
                .map_err(|_| format!("{n} does not fit the function's i32 parameter"))?,
        ),
        (ValType::I64, Some(n)) => Val::I64(n),
        (ValType::F32, _) => Val::F32((number.as_f64().unwrap_or_default() as f32).into()),
        (ValType::F64, _) => Val::F64(number.as_f64().unwrap_or_default().into()),
        (ValType::I32 | ValType::I64, None) => {
            return Err(format!(
                "{number} is not an integer, and the function takes one"
            ))
        }
        (other, _) => {
            return Err(format!(
                "the function takes a {other:?}, which tasks cannot pass"
            ))
        }
    })
}

fn result(value: &Val) -> Value {
    match value {
        Val::I32(n) => Value::from(*n),
        Val::I64(n) => Value::from(*n),
        Val::F32(f) => serde_json::Number::from_f64(f64::from(f32::from(*f)))
            .map_or(Value::Null, Value::Number),
        Val::F64(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        timeout: Duration::from_secs(5),
        max_memory: 16 << 20,
    };

    fn module(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    fn add() -> Vec<u8> {
        module(
            r#"(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))"#,
        )
    }

    #[test]
    fn runs_the_exported_function() {
        assert_eq!(
            run(&add(), "add", &[json!(3), json!(4)], LIMITS, || false),
            Ok(json!(7))
        );
        let pair = module(
            r#"(module (func (export "pair") (param i64) (result i64 f64) local.get 0 f64.const 0.5))"#,
        );
        assert_eq!(
            run(&pair, "pair", &[json!(-2)], LIMITS, || false),
            Ok(json!([-2, 0.5]))
        );
    }

    #[test]
    fn every_failure_is_an_error_not_a_panic() {
        let err = |bytes: &[u8], name: &str, inputs: &[Value]| {
            run(bytes, name, inputs, LIMITS, || false).unwrap_err()
        };
        assert!(err(b"not wasm", "add", &[]).starts_with("the module does not load"));
        assert!(err(&add(), "sub", &[]).contains("exports no function \"sub\""));
        assert!(err(&add(), "add", &[json!(1)]).contains("takes 2 arguments, the task gives 1"));
        assert!(err(&add(), "add", &[json!(1), json!("x")]).starts_with("input 1:"));
        assert!(err(&add(), "add", &[json!(1), json!(1.5)]).contains("not an integer"));
        let trap = module(r#"(module (func (export "boom") unreachable))"#);
        assert!(err(&trap, "boom", &[]).starts_with("the module trapped"));
        let wasi = module(
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func)) (func (export "f")))"#,
        );
        assert!(err(&wasi, "f", &[]).contains("imports wasi_snapshot_preview1::fd_write"));
        let greedy = module(
            r#"(module (memory (export "m") 1) (func (export "grow") (result i32) i32.const 1000 memory.grow))"#,
        );
        // Refused growth is -1 in WebAssembly, not a trap.
        assert_eq!(run(&greedy, "grow", &[], LIMITS, || false), Ok(json!(-1)));
    }

    #[test]
    fn endless_loops_time_out_and_stop() {
        let spin = module(r#"(module (func (export "spin") (loop (br 0))))"#);
        let quick = Limits {
            timeout: Duration::from_millis(200),
            ..LIMITS
        };
        let started = Instant::now();
        let error = run(&spin, "spin", &[], quick, || false).unwrap_err();
        assert!(error.starts_with("timed out"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let error = run(&spin, "spin", &[], LIMITS, || true).unwrap_err();
        assert_eq!(error, "stopped by the manager");
    }
}
