//! A client for the Confluent-compatible Schema Registry API (`/schemas/ids/{id}`,
//! `/subjects/{subject}/versions`), as served by Confluent Schema Registry, Apicurio
//! (`/apis/ccompat/v7`) and Karapace.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered that the schema id does not exist.
    #[error("schema id {0} is not known to the registry")]
    UnknownId(u32),
    /// The registry could not be reached or failed; retrying may help.
    #[error("schema registry at {url} is unavailable: {message}")]
    Unavailable { url: String, message: String },
    /// The registry answered with something we cannot use.
    #[error("schema registry at {url} answered unexpectedly: {message}")]
    Protocol { url: String, message: String },
}

#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .finish()
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl RegistryClient {
    pub fn new(base: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        RegistryClient {
            base: base.trim_end_matches('/').to_string(),
            agent,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn unavailable(&self, message: impl ToString) -> RegistryError {
        RegistryError::Unavailable {
            url: self.base.clone(),
            message: message.to_string(),
        }
    }

    fn protocol(&self, message: impl ToString) -> RegistryError {
        RegistryError::Protocol {
            url: self.base.clone(),
            message: message.to_string(),
        }
    }

    /// The schema text registered under `id`.
    pub fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let mut response = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| self.unavailable(e))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| self.unavailable(e))?;
        match status {
            200 => {
                let value: serde_json::Value =
                    serde_json::from_str(&body).map_err(|e| self.protocol(e))?;
                value["schema"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.protocol(format!("no `schema` in {body}")))
            }
            404 => Err(RegistryError::UnknownId(id)),
            _ => Err(self.unavailable(format!("HTTP {status}: {body}"))),
        }
    }

    /// Registers (or finds) `schema` under `subject` and returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{subject}/versions", self.base);
        let body = serde_json::json!({ "schema": schema }).to_string();
        let mut response = self
            .agent
            .post(&url)
            .header("Content-Type", CONTENT_TYPE)
            .send(body.as_str())
            .map_err(|e| self.unavailable(e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| self.unavailable(e))?;
        if status != 200 {
            return Err(self.protocol(format!("registering `{subject}`: HTTP {status}: {text}")));
        }
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| self.protocol(e))?;
        value["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| self.protocol(format!("no `id` in {text}")))
    }
}
