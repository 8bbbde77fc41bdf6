//! Property tests: every inbound payload parser returns a value or an error,
//! whatever arrives on the channel, and never panics.

use proptest::prelude::*;

/// JSON that looks like Propeller's payloads: the right keys with values of
/// any type, nulls, nesting, and plain garbage.
fn payload_json() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "\"[ -~]{0,12}\"",
        Just("true".to_owned()),
        Just("[]".to_owned()),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("id"),
                        Just("name"),
                        Just("inputs"),
                        Just("cli_args"),
                        Just("env"),
                        Just("file"),
                        Just("image_url"),
                        Just("proplet_id"),
                        Just("results"),
                        Just("error"),
                        Just("metadata"),
                        Just("total_chunks"),
                        Just("chunk_idx"),
                        Just("data"),
                        Just("app_name"),
                        Just("timestamp"),
                        Just("cpu_metrics"),
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|fields| {
                let fields: Vec<String> =
                    fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    });
    prop_oneof![
        value.prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every inbound payload parser returns a value or an error, whatever
    /// arrives on the channel.
    #[test]
    fn payload_parsers_never_panic(bytes in payload_json()) {
        use crate::*;
        let _ = serde_json::from_slice::<StartTask>(&bytes);
        let _ = serde_json::from_slice::<StopTask>(&bytes);
        let _ = serde_json::from_slice::<TaskResult>(&bytes);
        let _ = serde_json::from_slice::<PropletCreate>(&bytes);
        let _ = serde_json::from_slice::<PropletAlive>(&bytes);
        let _ = serde_json::from_slice::<PropletMetrics>(&bytes);
        let _ = serde_json::from_slice::<ModuleRequest>(&bytes);
        let _ = serde_json::from_slice::<ModuleChunk>(&bytes);
        let _ = serde_json::from_slice::<ModuleError>(&bytes);
    }
}
