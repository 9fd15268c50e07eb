//! SQL values between JavaScript and the core: `null`/`undefined`, booleans (as 0/1), numbers
//! (integers when they are safe integers), `BigInt`s, strings and `Uint8Array`s (blobs).

use pagesync::Value;
use wasm_bindgen::{JsCast, JsValue};

const MAX_SAFE: f64 = 9_007_199_254_740_991.0;

pub fn from_js(v: &JsValue) -> Result<Value, String> {
    if v.is_null() || v.is_undefined() {
        return Ok(Value::Null);
    }
    if let Some(b) = v.as_bool() {
        return Ok(Value::Integer(b.into()));
    }
    if let Some(f) = v.as_f64() {
        let integral = f.fract() == 0.0 && f.abs() <= MAX_SAFE;
        return Ok(if integral { Value::Integer(f as i64) } else { Value::Real(f) });
    }
    if let Some(s) = v.as_string() {
        return Ok(Value::Text(s));
    }
    if v.is_bigint() {
        let b: js_sys::BigInt = v.clone().unchecked_into();
        return i64::try_from(b)
            .map(Value::Integer)
            .map_err(|_| "a BigInt parameter does not fit in 64 bits".into());
    }
    if let Some(a) = v.dyn_ref::<js_sys::Uint8Array>() {
        return Ok(Value::Blob(a.to_vec()));
    }
    Err(format!("unsupported SQL parameter {v:?}: use null, a boolean, number, BigInt, string or Uint8Array"))
}

/// Parameters from a JS array (or nothing).
pub fn params_from_js(params: &JsValue) -> Result<Vec<Value>, String> {
    if params.is_null() || params.is_undefined() {
        return Ok(Vec::new());
    }
    let array = params.dyn_ref::<js_sys::Array>().ok_or("parameters must be an array")?;
    array.iter().map(|v| from_js(&v)).collect()
}

pub fn to_js(v: &Value) -> JsValue {
    match v {
        Value::Null => JsValue::NULL,
        Value::Integer(i) if (*i as f64).abs() <= MAX_SAFE => JsValue::from_f64(*i as f64),
        Value::Integer(i) => js_sys::BigInt::from(*i).into(),
        Value::Real(f) => JsValue::from_f64(*f),
        Value::Text(s) => JsValue::from_str(s),
        Value::Blob(b) => js_sys::Uint8Array::from(&b[..]).into(),
    }
}
