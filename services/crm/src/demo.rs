//! `crm demo seed`: realistic demo data for one tenant, sent through the
//! public gRPC API like any client would. Every command carries an
//! idempotency key derived from the seed's own numbering, so running it again
//! changes nothing and answers the same ids.
use std::net::SocketAddr;
use std::time::Duration;

use crm_proto::v1::accounts_client::AccountsClient;
use crm_proto::v1::contacts_client::ContactsClient;
use crm_proto::v1::leads_client::LeadsClient;
use crm_proto::v1::opportunities_client::OpportunitiesClient;
use crm_proto::v1::pipelines_client::PipelinesClient;
use crm_proto::v1::{
    AccountKind, CaptureLeadRequest, ChangeContactConsentRequest, ChangeLeadStatusRequest,
    ChangeOpportunityStageRequest, CommandOptions, ContactPreferences, ConvertLeadRequest,
    ConvertedOpportunity, CreateAccountRequest, CreateContactRequest, EmailAddress, LeadConsent,
    LeadSource, LoseOpportunityRequest, Money, OpenOpportunityRequest, PersonName, PhoneNumber,
    PipelineStage, PublishPipelineRequest, Reason, StageKind, UpdateLeadDetailsRequest,
    WinOpportunityRequest,
};
use tonic::Request;
use tonic::transport::Channel;

/// What the seed created (or found from an earlier run).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    pub accounts: usize,
    pub contacts: usize,
    /// Consent decisions (contacts', and leads' given after capture).
    pub consents: usize,
    pub leads: usize,
    pub conversions: usize,
    pub opportunities: usize,
    /// Service, commerce, campaign and NPS commands (calendar, SLA policy,
    /// queue, agents, tickets and their moves, orders, payments, a refund,
    /// a campaign with its cost and responses, NPS answers).
    pub more: usize,
    /// Commands answered from an earlier run's outcome.
    pub unchanged: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot reach {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("{what} was refused: {status}")]
    Refused { what: String, status: tonic::Status },
}

const COMPANIES: &[(&str, &str, &str)] = &[
    ("Acme", "acme", "Manufacturing"),
    ("Globex", "globex", "Energy"),
    ("Initech", "initech", "Software"),
    ("Umbrella", "umbrella", "Pharmaceuticals"),
    ("Hooli", "hooli", "Internet"),
    ("Stark Industries", "stark", "Aerospace"),
    ("Wayne Enterprises", "wayne", "Conglomerate"),
    ("Tyrell", "tyrell", "Biotech"),
    ("Soylent", "soylent", "Food"),
    ("Cyberdyne", "cyberdyne", "Robotics"),
    ("Wonka", "wonka", "Confectionery"),
    ("Oscorp", "oscorp", "Chemicals"),
    ("Vandelay", "vandelay", "Import/Export"),
    ("Gringotts", "gringotts", "Banking"),
    ("Monarch", "monarch", "Research"),
];
const REGIONS: &[(&str, &str, &str, &str)] = &[
    ("Ltd", "en-GB", "Europe/London", "+44207183"),
    ("GmbH", "de-DE", "Europe/Berlin", "+49301234"),
    ("有限公司", "zh-Hans-CN", "Asia/Shanghai", "+86138001"),
];
const GIVEN: &[&str] = &[
    "Ada", "Grace", "Alan", "Barbara", "Edsger", "Frances", "Donald", "Margaret", "Ken", "Radia",
    "Wei", "Li", "Mei", "Jun", "Hannah", "Lukas", "Sofia", "Noah", "Olivia", "Mateo",
];
const FAMILY: &[&str] = &[
    "Lovelace", "Hopper", "Turing", "Liskov", "Dijkstra", "Allen", "Knuth", "Hamilton", "Thompson",
    "Perlman", "Zhang", "Wang", "Chen", "Liu", "Schmidt", "Müller", "Rossi", "García", "Smith",
];
const TITLES: &[&str] = &[
    "CEO",
    "CTO",
    "Head of Procurement",
    "Buyer",
    "Engineer",
    "Analyst",
    "Office Manager",
];

/// The demo pipeline's id, fixed so the README's queries can name it.
pub const PIPELINE_ID: &str = "0193a000-0000-7000-8000-00000000d3e0";

/// Leads to capture; every `CONVERT_EVERY`-th is qualified and converted.
pub const LEADS: usize = 60;
pub const CONVERT_EVERY: usize = 6;

/// Accounts to create; each gets `CONTACTS_PER_ACCOUNT` contacts.
pub const ACCOUNTS: usize = 30;
pub const CONTACTS_PER_ACCOUNT: usize = 10;

fn request<T>(tenant: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(Duration::from_secs(30));
    let metadata = request.metadata_mut();
    metadata.insert("x-tenant-id", tenant.parse().expect("tenant ids are ASCII"));
    metadata.insert("x-actor-id", "system:demo-seed".parse().expect("ASCII"));
    request
}

/// Business times count back from a fixed instant, so a second run sends
/// exactly the same requests (idempotency compares them).
const ANCHOR: &str = "2026-11-01T09:00:00Z";

fn options(key: String, days_ago: u64) -> Option<CommandOptions> {
    let anchor: jiff::Timestamp = ANCHOR.parse().expect("valid anchor");
    let at = anchor - jiff::SignedDuration::from_hours(24 * days_ago as i64);
    Some(CommandOptions {
        idempotency_key: key,
        expected_version: None,
        occurred_at: at.to_string(),
    })
}

/// Seeds `tenant` through the gRPC server at `address`.
pub async fn seed(address: SocketAddr, tenant: &str) -> Result<Seeded, SeedError> {
    let channel: Channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|source| SeedError::Connect { address, source })?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| SeedError::Connect { address, source })?;
    let mut accounts = AccountsClient::new(channel.clone());
    let mut contacts = ContactsClient::new(channel.clone());
    let mut leads = LeadsClient::new(channel.clone());
    let mut pipelines = PipelinesClient::new(channel.clone());
    let mut opportunities = OpportunitiesClient::new(channel.clone());
    let mut contact_ids = Vec::with_capacity(ACCOUNTS * CONTACTS_PER_ACCOUNT);
    let mut lead_ids = Vec::with_capacity(LEADS);

    let mut account_ids = Vec::with_capacity(ACCOUNTS);
    let mut seeded = Seeded::default();
    let refused = |what: String| move |status| SeedError::Refused { what, status };
    let stage = |key: &str, kind: StageKind, probability_bp: u32, category: &str| PipelineStage {
        key: key.to_owned(),
        name: key.replace('_', " "),
        kind: kind.into(),
        probability_bp,
        category: category.to_owned(),
        max_days_in_stage: 14,
        required_fields: vec![],
    };
    let pipeline = pipelines
        .publish_pipeline(as_admin(
            tenant,
            PublishPipelineRequest {
                options: options("demo-seed:pipeline".to_owned(), 365),
                pipeline_id: PIPELINE_ID.to_owned(),
                name: "New business".to_owned(),
                stages: vec![
                    stage("qualification", StageKind::Open, 1000, "pipeline"),
                    stage("discovery", StageKind::Open, 2500, "pipeline"),
                    stage("proposal", StageKind::Open, 5000, "best_case"),
                    stage("negotiation", StageKind::Open, 8000, "commit"),
                    stage("won", StageKind::Won, 10_000, "closed"),
                    stage("lost", StageKind::Lost, 0, "omitted"),
                ],
                stage_mapping: Default::default(),
            },
        ))
        .await
        .map_err(refused("pipeline".to_owned()))?
        .into_inner();
    seeded.unchanged += usize::from(pipeline.unchanged);

    for a in 0..ACCOUNTS {
        let (company, slug, industry) = COMPANIES[a % COMPANIES.len()];
        let (suffix, language, zone, phone_prefix) = REGIONS[a % REGIONS.len()];
        let generation = a / COMPANIES.len();
        let domain = format!(
            "{slug}{}.example",
            if generation == 0 {
                String::new()
            } else {
                generation.to_string()
            }
        );
        // Spread over the last year of business time, oldest first.
        let days_ago = 365 - (a as u64 * 365 / ACCOUNTS as u64);
        let reply = accounts
            .create_account(request(
                tenant,
                CreateAccountRequest {
                    options: options(format!("demo-seed:account:{a}"), days_ago),
                    account_id: String::new(),
                    kind: AccountKind::Company.into(),
                    name: format!("{company} {suffix}"),
                    domains: vec![domain.clone()],
                    industry: industry.to_owned(),
                    tax_id: format!("DEMO{a:06}"),
                    parent_id: String::new(),
                    segment: ["enterprise", "mid_market", "smb"][a % 3].to_owned(),
                    credit_terms: None,
                },
            ))
            .await
            .map_err(refused(format!("account {a}")))?
            .into_inner();
        seeded.accounts += 1;
        seeded.unchanged += usize::from(reply.unchanged);
        account_ids.push(reply.stream_id.clone());

        for c in 0..CONTACTS_PER_ACCOUNT {
            let n = a * CONTACTS_PER_ACCOUNT + c;
            let given = GIVEN[(n * 7) % GIVEN.len()];
            let family = FAMILY[(n * 11) % FAMILY.len()];
            let reply = contacts
                .create_contact(request(
                    tenant,
                    CreateContactRequest {
                        options: options(
                            format!("demo-seed:contact:{n}"),
                            days_ago.saturating_sub(c as u64),
                        ),
                        contact_id: String::new(),
                        name: Some(PersonName {
                            given: given.to_owned(),
                            family: family.to_owned(),
                        }),
                        emails: vec![EmailAddress {
                            address: format!("{}.{}{n}@{domain}", given.to_lowercase(), c),
                            primary: true,
                        }],
                        phones: vec![PhoneNumber {
                            number: format!("{phone_prefix}{n:05}"),
                            kind: "work".to_owned(),
                        }],
                        title: TITLES[n % TITLES.len()].to_owned(),
                        preferences: Some(ContactPreferences {
                            channel: ["email", "phone", "chat"][n % 3].to_owned(),
                            language: language.to_owned(),
                            time_zone: zone.to_owned(),
                            do_not_contact: n.is_multiple_of(17),
                        }),
                    },
                ))
                .await
                .map_err(refused(format!("contact {n}")))?
                .into_inner();
            seeded.contacts += 1;
            seeded.unchanged += usize::from(reply.unchanged);
            contact_ids.push((reply.stream_id.clone(), a));
            if n.is_multiple_of(3) {
                let reply = contacts
                    .change_contact_consent(request(
                        tenant,
                        ChangeContactConsentRequest {
                            options: options(
                                format!("demo-seed:consent:{n}"),
                                days_ago.saturating_sub(c as u64),
                            ),
                            contact_id: reply.stream_id,
                            purpose: "marketing_email".to_owned(),
                            granted: n.is_multiple_of(2),
                            source: "web_form".to_owned(),
                            basis: "consent".to_owned(),
                        },
                    ))
                    .await
                    .map_err(refused(format!("consent {n}")))?
                    .into_inner();
                seeded.consents += 1;
                seeded.unchanged += usize::from(reply.unchanged);
            }
        }
        tracing::info!(account = a + 1, of = ACCOUNTS, "demo accounts seeded");
    }

    for l in 0..LEADS {
        let given = GIVEN[(l * 13) % GIVEN.len()];
        let family = FAMILY[(l * 5) % FAMILY.len()];
        let (company, slug, _) = COMPANIES[(l * 3) % COMPANIES.len()];
        let days_ago = 360 - (l as u64 * 360 / LEADS as u64);
        let reply = leads
            .capture_lead(request(
                tenant,
                CaptureLeadRequest {
                    options: options(format!("demo-seed:lead:{l}"), days_ago),
                    lead_id: String::new(),
                    name: Some(PersonName {
                        given: given.to_owned(),
                        family: family.to_owned(),
                    }),
                    company: format!("{company} Prospects {l}"),
                    emails: vec![EmailAddress {
                        address: format!("{}.{l}@lead.{slug}.example", given.to_lowercase()),
                        primary: true,
                    }],
                    phones: Vec::new(),
                    source: Some(LeadSource {
                        channel: ["web", "event", "referral", "import"][l % 4].to_owned(),
                        utm_source: ["newsletter", "linkedin", "", "search"][l % 4].to_owned(),
                        ..LeadSource::default()
                    }),
                    consent: Vec::new(),
                },
            ))
            .await
            .map_err(refused(format!("lead {l}")))?
            .into_inner();
        seeded.leads += 1;
        seeded.unchanged += usize::from(reply.unchanged);
        let lead_id = reply.stream_id;
        // Every other lead ticked the newsletter box: it may join the email
        // campaign below (a request of its own, so a database seeded before
        // leads held consent takes it too).
        if l % 2 == 0 {
            let reply = leads
                .update_lead_details(request(
                    tenant,
                    UpdateLeadDetailsRequest {
                        options: options(format!("demo-seed:lead-consent:{l}"), days_ago),
                        lead_id: lead_id.clone(),
                        consent: vec![LeadConsent {
                            purpose: "marketing_email".to_owned(),
                            granted: true,
                            source: "web_form".to_owned(),
                            basis: "consent".to_owned(),
                        }],
                        ..Default::default()
                    },
                ))
                .await;
            match reply {
                Ok(reply) => {
                    seeded.consents += 1;
                    seeded.unchanged += usize::from(reply.into_inner().unchanged);
                }
                // A database seeded before leads held consent converted this
                // lead already; its contact and membership are there.
                Err(status) if converted_earlier(&status) => {}
                Err(status) => return Err(refused(format!("lead {l}'s consent"))(status)),
            }
        }
        lead_ids.push((lead_id.clone(), days_ago));
        // A path through the lifecycle, a few days apart.
        let path: &[&str] = match l % CONVERT_EVERY {
            0 => &["working", "qualified"],
            1 | 2 => &["working"],
            3 => &["working", "nurturing"],
            4 => &["disqualified"],
            _ => &[],
        };
        for (step, to) in path.iter().enumerate() {
            let reply = leads
                .change_lead_status(request(
                    tenant,
                    ChangeLeadStatusRequest {
                        options: options(
                            format!("demo-seed:lead:{l}:{to}"),
                            days_ago.saturating_sub(3 * (step as u64 + 1)),
                        ),
                        lead_id: lead_id.clone(),
                        status: (*to).to_owned(),
                        reason: (*to == "disqualified").then(|| Reason {
                            code: "no_budget".to_owned(),
                            text: String::new(),
                        }),
                    },
                ))
                .await
                .map_err(refused(format!("lead {l} to {to}")))?
                .into_inner();
            seeded.unchanged += usize::from(reply.unchanged);
        }
        if l % CONVERT_EVERY == 0 {
            let reply = leads
                .convert_lead(request(
                    tenant,
                    ConvertLeadRequest {
                        options: options(
                            format!("demo-seed:lead:{l}:convert"),
                            days_ago.saturating_sub(10),
                        ),
                        lead_id: lead_id.clone(),
                        account_id: String::new(),
                        // Every converted lead opens its first deal.
                        opportunity: Some(ConvertedOpportunity {
                            name: format!("Lead {l} first order"),
                            pipeline_id: pipeline.stream_id.clone(),
                            stage: "qualification".to_owned(),
                            amount: Some(Money {
                                amount_minor: 1_000_000 + (l as i64 * 250_000) % 4_000_000,
                                currency: "EUR".to_owned(),
                            }),
                            close_date: "2026-12-31".to_owned(),
                            owner: format!("user:rep{}", l % 5),
                        }),
                    },
                ))
                .await
                .map_err(refused(format!("conversion of lead {l}")))?
                .into_inner();
            seeded.conversions += 1;
            seeded.unchanged += usize::from(reply.unchanged);
        }
    }
    tracing::info!(leads = LEADS, "demo leads seeded");

    // Two deals per account, spread over the year and the stages: some won,
    // some lost, the rest open.
    for (a, account_id) in account_ids.iter().enumerate() {
        for d in 0..2 {
            let n = a * 2 + d;
            let days_ago = 330 - (n as u64 * 330 / (2 * ACCOUNTS) as u64);
            let reply = opportunities
                .open_opportunity(request(
                    tenant,
                    OpenOpportunityRequest {
                        options: options(format!("demo-seed:deal:{n}"), days_ago),
                        opportunity_id: String::new(),
                        name: format!("Deal {n}"),
                        account_id: account_id.clone(),
                        contact_id: String::new(),
                        pipeline_id: pipeline.stream_id.clone(),
                        stage: "qualification".to_owned(),
                        amount: Some(Money {
                            amount_minor: 500_000 + (n as i64 * 137_000) % 9_000_000,
                            currency: "EUR".to_owned(),
                        }),
                        close_date: (jiff::civil::date(2026, 12, 31)
                            - jiff::Span::new().days((n * 5) as i64))
                        .to_string(),
                        owner: format!("user:rep{}", n % 5),
                    },
                ))
                .await
                .map_err(refused(format!("deal {n}")))?
                .into_inner();
            seeded.opportunities += 1;
            seeded.unchanged += usize::from(reply.unchanged);
            let deal_id = reply.stream_id;
            let stages: &[&str] = match n % 5 {
                0 => &["discovery", "proposal", "negotiation"],
                1 => &["discovery"],
                2 => &["discovery", "proposal"],
                3 => &["proposal"],
                _ => &[],
            };
            for (step, to) in stages.iter().enumerate() {
                let reply = opportunities
                    .change_opportunity_stage(request(
                        tenant,
                        ChangeOpportunityStageRequest {
                            options: options(
                                format!("demo-seed:deal:{n}:{to}"),
                                days_ago.saturating_sub(7 * (step as u64 + 1)),
                            ),
                            opportunity_id: deal_id.clone(),
                            stage: (*to).to_owned(),
                        },
                    ))
                    .await
                    .map_err(refused(format!("deal {n} to {to}")))?
                    .into_inner();
                seeded.unchanged += usize::from(reply.unchanged);
            }
            let closed_at = days_ago.saturating_sub(30);
            if n % 5 == 0 {
                let reply = opportunities
                    .win_opportunity(request(
                        tenant,
                        WinOpportunityRequest {
                            options: options(format!("demo-seed:deal:{n}:won"), closed_at),
                            opportunity_id: deal_id.clone(),
                        },
                    ))
                    .await
                    .map_err(refused(format!("deal {n} won")))?
                    .into_inner();
                seeded.unchanged += usize::from(reply.unchanged);
            } else if n % 5 == 4 {
                let reply = opportunities
                    .lose_opportunity(request(
                        tenant,
                        LoseOpportunityRequest {
                            options: options(format!("demo-seed:deal:{n}:lost"), closed_at),
                            opportunity_id: deal_id.clone(),
                            reason: Some(Reason {
                                code: ["price", "timing", "competitor"][n % 3].to_owned(),
                                text: String::new(),
                            }),
                            competitor: if n % 3 == 2 {
                                "Initech".to_owned()
                            } else {
                                String::new()
                            },
                        },
                    ))
                    .await
                    .map_err(refused(format!("deal {n} lost")))?
                    .into_inner();
                seeded.unchanged += usize::from(reply.unchanged);
            }
        }
    }
    more(
        &channel,
        tenant,
        &account_ids,
        &contact_ids,
        &lead_ids,
        &mut seeded,
    )
    .await?;
    Ok(seeded)
}

/// Sends one seed command: `$call` on `$client` with `$message`, counted.
/// The refusal of a change to a lead an earlier run already converted.
fn converted_earlier(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    status.code() == tonic::Code::FailedPrecondition
        && status
            .get_details_error_info()
            .is_some_and(|info| info.metadata.get("from").map(String::as_str) == Some("converted"))
}

macro_rules! send {
    ($seeded:expr, $what:expr, $client:ident . $call:ident ($request:expr)) => {{
        let reply = $client
            .$call($request)
            .await
            .map_err(|status| SeedError::Refused {
                what: $what,
                status,
            })?
            .into_inner();
        $seeded.more += 1;
        $seeded.unchanged += usize::from(reply.unchanged);
        reply
    }};
}

/// As the tenant's ERP service account (`crm.v1.Commerce` needs its role).
fn as_erp<T>(tenant: &str, message: T) -> Request<T> {
    let mut request = request(tenant, message);
    request
        .metadata_mut()
        .insert("x-roles", "erp_sync".parse().expect("ASCII"));
    request
}

fn as_admin<T>(tenant: &str, message: T) -> Request<T> {
    let mut request = request(tenant, message);
    request
        .metadata_mut()
        .insert("x-roles", "admin".parse().expect("ASCII"));
    request
}

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency: "EUR".to_owned(),
    })
}

/// Tickets (SLA policy on a business calendar, a queue of two agents),
/// orders with payments and a refund, a campaign with cost and lead
/// responses, NPS answers: so service queues, SLA clocks and the analytics
/// have something to show.
async fn more(
    channel: &Channel,
    tenant: &str,
    account_ids: &[String],
    contact_ids: &[(String, usize)],
    lead_ids: &[(String, u64)],
    seeded: &mut Seeded,
) -> Result<(), SeedError> {
    use crm_proto::v1::campaigns_client::CampaignsClient;
    use crm_proto::v1::commerce_client::CommerceClient;
    use crm_proto::v1::configuration_client::ConfigurationClient;
    use crm_proto::v1::tickets_client::TicketsClient;
    use crm_proto::v1::{
        AddCampaignMemberRequest, AddTicketMessageRequest, AssignTicketRequest,
        ChangeAgentAvailabilityRequest, ChangeTicketStatusRequest, ExternalRef, IssueRefundRequest,
        OpenTicketRequest, OrderLine, PlanCampaignRequest, PublishBusinessCalendarRequest,
        PublishQueueRequest, PublishSlaPolicyRequest, RecordCampaignCostRequest,
        RecordCampaignResponseRequest, RecordCsatRequest, RecordNpsResponseRequest,
        RecordOrderRequest, RecordPaymentRequest, SlaTargets, SolveTicketRequest, WorkingHours,
    };
    let mut configuration = ConfigurationClient::new(channel.clone());
    let mut tickets = TicketsClient::new(channel.clone());
    let mut commerce = CommerceClient::new(channel.clone());
    let mut campaigns = CampaignsClient::new(channel.clone());
    let mut contacts = ContactsClient::new(channel.clone());

    let calendar = send!(
        seeded,
        "calendar".to_owned(),
        configuration.publish_business_calendar(as_admin(
            tenant,
            PublishBusinessCalendarRequest {
                options: options("demo-seed:calendar".to_owned(), 365),
                calendar_id: String::new(),
                name: "London office".to_owned(),
                time_zone: "Europe/London".to_owned(),
                weekly: (1..=5)
                    .map(|weekday| WorkingHours {
                        weekday,
                        start: "09:00".to_owned(),
                        end: "17:30".to_owned(),
                    })
                    .collect(),
                overrides: Vec::new(),
            },
        ))
    );
    let targets = |priority: &str, first: u32, next: u32, resolution: u32| SlaTargets {
        priority: priority.to_owned(),
        first_response_minutes: first,
        next_response_minutes: next,
        resolution_minutes: resolution,
    };
    send!(
        seeded,
        "SLA policy".to_owned(),
        configuration.publish_sla_policy(as_admin(
            tenant,
            PublishSlaPolicyRequest {
                options: options("demo-seed:sla-policy".to_owned(), 365),
                policy_id: String::new(),
                name: "Standard support".to_owned(),
                order: 10,
                ticket_types: Vec::new(),
                targets: vec![
                    targets("urgent", 60, 120, 480),
                    targets("high", 120, 240, 960),
                    targets("normal", 240, 480, 1920),
                    targets("low", 480, 960, 2880),
                ],
                calendar_id: calendar.stream_id,
                pause_statuses: vec!["pending".to_owned(), "on_hold".to_owned()],
                warning_percent: 75,
            },
        ))
    );
    let agents = ["agent:ana", "agent:ben"];
    for (i, agent) in agents.iter().enumerate() {
        send!(
            seeded,
            format!("agent {agent}"),
            configuration.change_agent_availability(as_admin(
                tenant,
                ChangeAgentAvailabilityRequest {
                    options: options(format!("demo-seed:agent:{i}"), 365),
                    agent: (*agent).to_owned(),
                    status: "online".to_owned(),
                    capacity: 20,
                    skills: vec!["billing".to_owned()],
                },
            ))
        );
    }
    let queue = send!(
        seeded,
        "queue".to_owned(),
        configuration.publish_queue(as_admin(
            tenant,
            PublishQueueRequest {
                options: options("demo-seed:queue".to_owned(), 365),
                queue_id: String::new(),
                name: "Support".to_owned(),
                members: agents.iter().map(|a| (*a).to_owned()).collect(),
                skills: Vec::new(),
                routing: "round_robin".to_owned(),
                overflow_queue_id: String::new(),
                overflow_after_minutes: None,
            },
        ))
    );

    // 24 tickets over the last three months: questions, incidents and a few
    // complaints; most answered, some waiting on the customer, half solved
    // and rated.
    for t in 0..24usize {
        let days_ago = 90 - (t as u64 * 90 / 24);
        let (requester, account) = &contact_ids[(t * 13) % contact_ids.len()];
        let key = |step: &str| format!("demo-seed:ticket:{t}:{step}");
        let ticket = send!(
            seeded,
            format!("ticket {t}"),
            tickets.open_ticket(request(
                tenant,
                OpenTicketRequest {
                    options: options(key("open"), days_ago),
                    ticket_id: String::new(),
                    requester_id: requester.clone(),
                    account_id: account_ids[*account].clone(),
                    channel: ["email", "phone", "chat", "web"][t % 4].to_owned(),
                    r#type: ["question", "incident", "request", "question", "complaint"][t % 5]
                        .to_owned(),
                    category: ["billing", "delivery", "product"][t % 3].to_owned(),
                    priority: String::new(),
                    subject: format!("Support request {t}"),
                },
            ))
        )
        .stream_id;
        send!(
            seeded,
            format!("ticket {t} queued"),
            tickets.assign_ticket(request(
                tenant,
                AssignTicketRequest {
                    options: options(key("queue"), days_ago),
                    ticket_id: ticket.clone(),
                    queue_id: queue.stream_id.clone(),
                    assignee: String::new(),
                    method: "rule".to_owned(),
                    override_reason: String::new(),
                },
            ))
        );
        if t % 4 == 3 {
            continue; // not answered yet
        }
        send!(
            seeded,
            format!("ticket {t} answered"),
            tickets.add_ticket_message(request(
                tenant,
                AddTicketMessageRequest {
                    options: options(key("answer"), days_ago.saturating_sub(1)),
                    ticket_id: ticket.clone(),
                    author_role: "agent".to_owned(),
                    author: agents[t % 2].to_owned(),
                    public: true,
                    body: "Thanks for reaching out; we are on it.".to_owned(),
                },
            ))
        );
        if t % 4 == 2 {
            send!(
                seeded,
                format!("ticket {t} pending"),
                tickets.change_ticket_status(request(
                    tenant,
                    ChangeTicketStatusRequest {
                        options: options(key("pending"), days_ago.saturating_sub(1)),
                        ticket_id: ticket.clone(),
                        status: "pending".to_owned(),
                    },
                ))
            );
            continue;
        }
        if t % 2 == 0 {
            send!(
                seeded,
                format!("ticket {t} solved"),
                tickets.solve_ticket(request(
                    tenant,
                    SolveTicketRequest {
                        options: options(key("solve"), days_ago.saturating_sub(2)),
                        ticket_id: ticket.clone(),
                        resolution: "Fixed and confirmed with the customer.".to_owned(),
                        root_cause: "process_gap".to_owned(),
                    },
                ))
            );
            send!(
                seeded,
                format!("ticket {t} rated"),
                tickets.record_csat(request(
                    tenant,
                    RecordCsatRequest {
                        options: options(key("csat"), days_ago.saturating_sub(2)),
                        ticket_id: ticket.clone(),
                        score: [5, 4, 3, 5, 2][t % 5],
                        comment: String::new(),
                    },
                ))
            );
        }
    }

    // Two paid orders per account over the year; one payment refunded.
    for (a, account) in account_ids.iter().enumerate() {
        for o in 0..2usize {
            let n = a * 2 + o;
            let days_ago = 300 - (n as u64 * 300 / (2 * account_ids.len() as u64));
            let net = 200_000 + (n as i64 * 37_000) % 800_000;
            let ordered = options(format!("demo-seed:order:{n}"), days_ago);
            let ordered_on = ordered
                .as_ref()
                .map(|o| o.occurred_at[..10].to_owned())
                .unwrap_or_default();
            let order = send!(
                seeded,
                format!("order {n}"),
                commerce.record_order(as_erp(
                    tenant,
                    RecordOrderRequest {
                        options: ordered,
                        external: Some(ExternalRef {
                            source: "erp".to_owned(),
                            external_id: format!("SO-{n:05}"),
                            external_version: 1,
                        }),
                        account_id: account.clone(),
                        customer_tax_id: String::new(),
                        customer_ref: format!("C-{a:05}"),
                        deal_id: String::new(),
                        status: "paid".to_owned(),
                        lines: vec![OrderLine {
                            sku: ["WIDGET", "GADGET", "SERVICE"][n % 3].to_owned(),
                            quantity: 1,
                            unit_price: eur(net),
                            line_total: eur(net),
                            line_cost: eur(net * 6 / 10),
                        }],
                        net: eur(net),
                        tax: eur(net / 5),
                        gross: eur(net + net / 5),
                        ordered_on: ordered_on.clone(),
                        promised_delivery: String::new(),
                    },
                ))
            );
            if n == 7 {
                let payment = ExternalRef {
                    source: "erp".to_owned(),
                    external_id: format!("PAY-{n:05}"),
                    external_version: 1,
                };
                send!(
                    seeded,
                    format!("payment {n}"),
                    commerce.record_payment(as_erp(
                        tenant,
                        RecordPaymentRequest {
                            options: options(format!("demo-seed:payment:{n}"), days_ago),
                            external: Some(payment.clone()),
                            account_id: account.clone(),
                            amount: eur(net + net / 5),
                            order_ids: vec![order.stream_id.clone()],
                            paid_on: ordered_on.clone(),
                        },
                    ))
                );
                send!(
                    seeded,
                    format!("refund {n}"),
                    commerce.issue_refund(as_erp(
                        tenant,
                        IssueRefundRequest {
                            options: options(format!("demo-seed:refund:{n}"), days_ago),
                            payment: Some(payment),
                            amount: eur(50_000),
                            refund_id: "RF-1".to_owned(),
                            refunded_on: ordered_on,
                        },
                    ))
                );
            }
        }
    }

    // A campaign the leads respond to, with its cost.
    let campaign = send!(
        seeded,
        "campaign".to_owned(),
        campaigns.plan_campaign(request(
            tenant,
            PlanCampaignRequest {
                options: options("demo-seed:campaign".to_owned(), 365),
                campaign_id: String::new(),
                name: "Spring webinar series".to_owned(),
                r#type: "webinar".to_owned(),
                channel: "email".to_owned(),
                parent_id: String::new(),
                starts_on: "2025-11-01".to_owned(),
                ends_on: "2026-10-31".to_owned(),
                budget: eur(5_000_000),
                owner: "user:marketing".to_owned(),
                utm_campaign: "spring-webinars".to_owned(),
            },
        ))
    )
    .stream_id;
    send!(
        seeded,
        "campaign cost".to_owned(),
        campaigns.record_campaign_cost(request(
            tenant,
            RecordCampaignCostRequest {
                options: options("demo-seed:campaign-cost".to_owned(), 360),
                campaign_id: campaign.clone(),
                amount: eur(1_500_000),
                spent_on: "2025-12-06".to_owned(),
                source: "invoice".to_owned(),
            },
        ))
    );
    for (l, (lead, days_ago)) in lead_ids.iter().enumerate().filter(|(l, _)| l % 2 == 0) {
        send!(
            seeded,
            format!("campaign member {l}"),
            campaigns.add_campaign_member(request(
                tenant,
                AddCampaignMemberRequest {
                    options: options(format!("demo-seed:member:{l}"), *days_ago),
                    campaign_id: campaign.clone(),
                    contact_id: String::new(),
                    lead_id: lead.clone(),
                },
            ))
        );
        send!(
            seeded,
            format!("campaign response {l}"),
            campaigns.record_campaign_response(request(
                tenant,
                RecordCampaignResponseRequest {
                    options: options(format!("demo-seed:response:{l}"), *days_ago),
                    campaign_id: campaign.clone(),
                    contact_id: String::new(),
                    response: "registered".to_owned(),
                    lead_id: lead.clone(),
                },
            ))
        );
    }

    // A call logged with every account, and a follow-up task for every
    // third (due around the anchor: some fall overdue).
    let mut activities = crm_proto::v1::activities_client::ActivitiesClient::new(channel.clone());
    for (a, account) in account_ids.iter().enumerate() {
        let target = || {
            vec![crm_proto::v1::ActivityTarget {
                kind: "account".to_owned(),
                id: account.clone(),
            }]
        };
        send!(
            seeded,
            format!("call {a}"),
            activities.log_activity(request(
                tenant,
                crm_proto::v1::LogActivityRequest {
                    options: options(format!("demo-seed:call:{a}"), 20 + (a as u64 * 7) % 150),
                    activity_id: String::new(),
                    kind: "call".to_owned(),
                    direction: "outbound".to_owned(),
                    targets: target(),
                    outcome: "Discussed renewal and next steps".to_owned(),
                    body: "Quarterly check-in call.".to_owned(),
                    external_id: String::new(),
                },
            ))
        );
        if a % 3 == 0 {
            let due: jiff::Timestamp = ANCHOR.parse().expect("valid anchor");
            let due = due + jiff::SignedDuration::from_hours(24 * (a as i64 - 10));
            send!(
                seeded,
                format!("task {a}"),
                activities.schedule_activity(request(
                    tenant,
                    crm_proto::v1::ScheduleActivityRequest {
                        options: options(format!("demo-seed:task:{a}"), 20),
                        activity_id: String::new(),
                        kind: "task".to_owned(),
                        targets: target(),
                        due: due.to_string(),
                        assignee: format!("user:rep{}", a % 5),
                        subject: "Send the renewal offer".to_owned(),
                    },
                ))
            );
        }
    }

    // NPS from every tenth contact.
    for (n, (contact, _)) in contact_ids.iter().enumerate().filter(|(n, _)| n % 10 == 0) {
        send!(
            seeded,
            format!("NPS {n}"),
            contacts.record_nps_response(request(
                tenant,
                RecordNpsResponseRequest {
                    options: options(format!("demo-seed:nps:{n}"), 30 + (n as u64 % 60)),
                    contact_id: contact.clone(),
                    score: [10, 9, 8, 7, 6, 10, 3, 9, 10, 5][(n / 10) % 10],
                    comment: String::new(),
                },
            ))
        );
    }
    Ok(())
}
