//! Service read models and routing end to end: the router process manager
//! gives queued tickets to eligible agents (round robin, least loaded,
//! waiting until someone frees up), `agent_workload` shows each agent's
//! load, `service_metrics` the response and resolution times, CSAT and
//! complaint figures, all computed by hand in the comments.
use std::time::Duration;

use crm_proto::v1::service_queries_client::ServiceQueriesClient;
use crm_proto::v1::{
    AddTicketMessageRequest, AgentLoad, AgentLoadRow, AssignTicketRequest,
    ChangeAgentAvailabilityRequest, CommandReply, ComplaintGroup, CsatGroup, DurationStats,
    GetAgentLoadRequest, GetComplaintStatsRequest, GetCsatRequest, GetServiceMetricsRequest,
    OpenTicketRequest, PublishQueueRequest, QueryOptions, RecordCsatRequest, ServiceMetrics,
    SolveTicketRequest,
};
use tonic::transport::Channel;

use crate::support::{TestApp, as_caller, at, bad_fields};

fn as_manager<T>(app: &TestApp, message: T) -> tonic::Request<T> {
    let mut request = app.request(message);
    request
        .metadata_mut()
        .insert("x-roles", "service_manager".parse().unwrap());
    request
}

fn queries(app: &TestApp) -> ServiceQueriesClient<Channel> {
    ServiceQueriesClient::new(app.channel.clone())
}

fn ts(text: &str) -> String {
    text.parse::<jiff::Timestamp>().unwrap().to_string()
}

/// Publishes a queue; its id.
async fn queue(app: &TestApp, members: &[&str], skills: &[&str], routing: &str) -> String {
    app.configuration()
        .publish_queue(as_manager(
            app,
            PublishQueueRequest {
                options: at("2026-03-01T00:00:00Z"),
                name: "Support".into(),
                members: members.iter().map(|m| (*m).to_owned()).collect(),
                skills: skills.iter().map(|s| (*s).to_owned()).collect(),
                routing: routing.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

async fn availability(
    app: &TestApp,
    agent: &str,
    status: &str,
    capacity: u32,
    skills: &[&str],
    when: &str,
) -> CommandReply {
    app.configuration()
        .change_agent_availability(as_manager(
            app,
            ChangeAgentAvailabilityRequest {
                options: at(when),
                agent: agent.into(),
                status: status.into(),
                capacity,
                skills: skills.iter().map(|s| (*s).to_owned()).collect(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Opens a ticket at `when`; its id.
async fn open(app: &TestApp, when: &str, channel: &str, kind: &str, category: &str) -> String {
    app.tickets()
        .open_ticket(app.request(OpenTicketRequest {
            options: at(when),
            requester_id: crate::support::person(app, "Ticket", "Requester").await,
            channel: channel.into(),
            r#type: kind.into(),
            category: category.into(),
            subject: "Help".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

/// Puts a ticket in a queue (no assignee: routing decides) or gives it to
/// `assignee` by hand.
async fn assign(
    app: &TestApp,
    ticket: &str,
    queue: &str,
    assignee: &str,
    when: &str,
) -> CommandReply {
    app.tickets()
        .assign_ticket(app.request(AssignTicketRequest {
            options: at(when),
            ticket_id: ticket.into(),
            queue_id: queue.into(),
            assignee: assignee.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

async fn say(app: &TestApp, ticket: &str, role: &str, author: &str, public: bool, when: &str) {
    app.tickets()
        .add_ticket_message(app.request(AddTicketMessageRequest {
            options: at(when),
            ticket_id: ticket.into(),
            author_role: role.into(),
            author: author.into(),
            public,
            body: "Hello".into(),
        }))
        .await
        .unwrap();
}

async fn solve(app: &TestApp, ticket: &str, root_cause: &str, when: &str) -> CommandReply {
    app.tickets()
        .solve_ticket(app.request(SolveTicketRequest {
            options: at(when),
            ticket_id: ticket.into(),
            resolution: "Done".into(),
            root_cause: root_cause.into(),
        }))
        .await
        .unwrap()
        .into_inner()
}

async fn rate(app: &TestApp, ticket: &str, score: u32, when: &str) -> CommandReply {
    app.tickets()
        .record_csat(app.request(RecordCsatRequest {
            options: at(when),
            ticket_id: ticket.into(),
            score,
            comment: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
}

/// Every assignment of a ticket, as stored: (queue, assignee, method,
/// occurred_at).
async fn assignments(app: &TestApp, ticket: &str) -> Vec<(String, Option<String>, String, String)> {
    let id = uuid::Uuid::parse_str(ticket).unwrap();
    app.db
        .client()
        .await
        .query(
            "SELECT payload FROM events WHERE stream_id = $1 AND event_type = 'TicketAssigned' \
             ORDER BY stream_version",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let payload: serde_json::Value = row.get(0);
            let text = |key: &str| payload[key].as_str().unwrap_or_default().to_owned();
            (
                text("queue"),
                payload["assignee"].as_str().map(str::to_owned),
                text("method"),
                text("occurred_at"),
            )
        })
        .collect()
}

/// The routed assignments of a ticket, as stored: (assignee, method,
/// occurred_at).
async fn routed(app: &TestApp, ticket: &str) -> Vec<(String, String, String)> {
    assignments(app, ticket)
        .await
        .into_iter()
        .filter_map(|(_, assignee, method, at)| {
            assignee
                .filter(|_| method != "manual")
                .map(|a| (a, method, at))
        })
        .collect()
}

/// Waits until the router gives `ticket` to someone; (assignee, method,
/// occurred_at).
async fn routed_to(app: &TestApp, ticket: &str) -> (String, String, String) {
    crm_test_support::eventually(
        Duration::from_secs(20),
        "the router's assignment",
        || async { routed(app, ticket).await.pop() },
    )
    .await
}

/// Waits until the router has handled the log up to `position`.
async fn router_reached(app: &TestApp, position: u64) {
    crate::support::reached(app, "router", position).await;
}

async fn head(app: &TestApp) -> u64 {
    let row = app
        .db
        .client()
        .await
        .query_one("SELECT max(global_position) FROM events", &[])
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

async fn agent_load(app: &TestApp, queue_id: &str, page_size: u32, token: &str) -> AgentLoad {
    let min_position = head(app).await;
    queries(app)
        .get_agent_load(app.request(GetAgentLoadRequest {
            options: Some(QueryOptions { min_position }),
            queue_id: queue_id.into(),
            page_size,
            page_token: token.into(),
        }))
        .await
        .unwrap()
        .into_inner()
}

/// (agent, status, capacity, open, [(channel, open)], load bp, last assigned).
type Load = (
    String,
    String,
    u32,
    u32,
    Vec<(String, u32)>,
    Option<u32>,
    String,
);

fn load(row: AgentLoadRow) -> Load {
    (
        row.agent,
        row.status,
        row.capacity,
        row.open_tickets,
        row.open_per_channel
            .into_iter()
            .map(|c| (c.channel, c.open_tickets))
            .collect(),
        row.load_bp,
        row.last_assigned_at,
    )
}

fn expect(
    agent: &str,
    status: &str,
    capacity: u32,
    channels: &[(&str, u32)],
    load_bp: Option<u32>,
    last: &str,
) -> Load {
    (
        agent.into(),
        status.into(),
        capacity,
        channels.iter().map(|(_, n)| n).sum(),
        channels.iter().map(|(c, n)| ((*c).into(), *n)).collect(),
        load_bp,
        if last.is_empty() {
            String::new()
        } else {
            ts(last)
        },
    )
}

#[tokio::test]
async fn round_robin_skips_offline_and_unskilled_agents_and_waiting_tickets_go_to_agents_who_free_up()
 {
    // No scheduler: on the system clock it would auto-close the ticket
    // solved in March at any moment, racing the count of stored events at
    // the end.
    let app = TestApp::spawn_with(|config| config.scheduler_interval_ms = 0).await;
    // Members a, b, c (billing), d (no skills); e has the skill but is no
    // member. Capacities a 2, b 3, c 2.
    let q = queue(
        &app,
        &["agent:a", "agent:b", "agent:c", "agent:d"],
        &["billing"],
        "round_robin",
    )
    .await;
    let morning = "2026-03-02T08:00:00Z";
    availability(&app, "agent:a", "online", 2, &["billing"], morning).await;
    availability(&app, "agent:b", "online", 3, &["billing"], morning).await;
    availability(&app, "agent:c", "online", 2, &["billing"], morning).await;
    availability(&app, "agent:d", "online", 5, &[], morning).await;
    availability(&app, "agent:e", "online", 5, &["billing"], morning).await;

    let enqueue = |minute: u32, channel: &'static str| {
        let app = &app;
        let q = q.clone();
        async move {
            let when = format!("2026-03-02T09:{minute:02}:00Z");
            let ticket = open(app, &when, channel, "question", "").await;
            let reply = assign(app, &ticket, &q, "", &when).await;
            (ticket, reply.global_position)
        }
    };
    let to = |agent: &str, minute: u32| {
        (
            agent.to_owned(),
            "round_robin".to_owned(),
            ts(&format!("2026-03-02T09:{minute:02}:00Z")),
        )
    };
    // Nobody was ever assigned: a, b, c in turn (d lacks the skill, e is
    // no member), then a again (assigned longest ago, 09:00): a is full.
    let (t1, _) = enqueue(0, "email").await;
    assert_eq!(routed_to(&app, &t1).await, to("agent:a", 0));
    let (t2, _) = enqueue(1, "chat").await;
    assert_eq!(routed_to(&app, &t2).await, to("agent:b", 1));
    let (t3, _) = enqueue(2, "phone").await;
    assert_eq!(routed_to(&app, &t3).await, to("agent:c", 2));
    let (t4, _) = enqueue(3, "chat").await;
    assert_eq!(routed_to(&app, &t4).await, to("agent:a", 3));
    // b (last 09:01) before c (09:02).
    let (t5, _) = enqueue(4, "email").await;
    assert_eq!(routed_to(&app, &t5).await, to("agent:b", 4));
    // c's turn (09:02 < b's 09:04), but c went offline: b, now full (3/3).
    availability(
        &app,
        "agent:c",
        "offline",
        2,
        &["billing"],
        "2026-03-02T09:05:00Z",
    )
    .await;
    let (t6, _) = enqueue(6, "email").await;
    assert_eq!(routed_to(&app, &t6).await, to("agent:b", 6));
    // a 2/2, b 3/3, c offline: t7 waits.
    let (t7, position) = enqueue(7, "web").await;
    router_reached(&app, position).await;
    assert!(routed(&app, &t7).await.is_empty(), "nobody is eligible");
    // c comes back at 09:08 and takes it (then 2/2).
    availability(
        &app,
        "agent:c",
        "online",
        2,
        &["billing"],
        "2026-03-02T09:08:00Z",
    )
    .await;
    assert_eq!(routed_to(&app, &t7).await, to("agent:c", 8));
    // Everyone full again: t8 waits until a solves t1 at 09:10.
    let (t8, position) = enqueue(9, "chat").await;
    router_reached(&app, position).await;
    assert!(routed(&app, &t8).await.is_empty(), "everyone is full");
    solve(&app, &t1, "", "2026-03-02T09:10:00Z").await;
    assert_eq!(routed_to(&app, &t8).await, to("agent:a", 10));
    for ticket in [&t1, &t2, &t3, &t4, &t5, &t6, &t7, &t8] {
        assert_eq!(routed(&app, ticket).await.len(), 1, "routed once");
    }

    // The queue's members: a holds t4 (chat) and t8 (chat), 2 of 2; b t2
    // (chat), t5, t6 (email), 3 of 3; c t3 (phone), t7 (web), 2 of 2; d
    // nothing, 0 of 5, never assigned.
    let members: Vec<Load> = agent_load(&app, &q, 0, "")
        .await
        .agents
        .into_iter()
        .map(load)
        .collect();
    assert_eq!(
        members,
        [
            expect(
                "agent:a",
                "online",
                2,
                &[("chat", 2)],
                Some(10_000),
                "2026-03-02T09:10:00Z"
            ),
            expect(
                "agent:b",
                "online",
                3,
                &[("chat", 1), ("email", 2)],
                Some(10_000),
                "2026-03-02T09:06:00Z"
            ),
            expect(
                "agent:c",
                "online",
                2,
                &[("phone", 1), ("web", 1)],
                Some(10_000),
                "2026-03-02T09:08:00Z"
            ),
            expect("agent:d", "online", 5, &[], Some(0), ""),
        ]
    );
    // Every agent, two a page: e is there too.
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = agent_load(&app, "", 2, &token).await;
        pages.push(
            page.agents
                .iter()
                .map(|a| a.agent.clone())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        pages,
        [
            vec!["agent:a", "agent:b"],
            vec!["agent:c", "agent:d"],
            vec!["agent:e"]
        ]
    );
    // Another tenant sees no agents.
    let other = queries(&app)
        .get_agent_load(as_caller(
            GetAgentLoadRequest::default(),
            Some("someone-else"),
            Some("user:eve"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(other.agents.is_empty());

    // Redelivery: the router applies the whole log again (its position
    // reset to 0, as after losing its checkpoint); nothing new is appended.
    let before = app.stored().await.len();
    crate::support::reset_position(&app, "router").await;
    let nudge = crate::support::nudge(&app).await;
    router_reached(&app, nudge).await;
    assert_eq!(app.stored().await.len(), before + 2, "only the nudge");
    app.stop().await;
}

#[tokio::test]
async fn least_loaded_routing_picks_the_lowest_share_of_capacity_and_bad_load_queries_are_refused()
{
    let app = TestApp::spawn().await;
    let q = queue(
        &app,
        &["agent:x", "agent:y", "agent:z"],
        &[],
        "least_loaded",
    )
    .await;
    let morning = "2026-03-02T08:00:00Z";
    availability(&app, "agent:x", "online", 2, &[], morning).await;
    availability(&app, "agent:y", "online", 4, &[], morning).await;
    availability(&app, "agent:z", "online", 3, &[], morning).await;
    // Loads before each ticket (open ÷ capacity) and the pick:
    // u1 0, 0, 0: tie, never assigned, by id → x (1/2)
    // u2 ½, 0, 0: y and z tie, never assigned → y (1/4)
    // u3 ½, ¼, 0 → z (1/3)
    // u4 ½, ¼, ⅓ → y (2/4)
    // u5 ½, ½, ⅓ → z (2/3)
    // u6 ½, ½, ⅔: x and y tie, x assigned longer ago (10:00 < 10:03) → x (2/2)
    // u7 x full, ½, ⅔ → y (3/4)
    // (Round robin would have given x, y, z, x, y, z, x.)
    let mut picks = Vec::new();
    for minute in 0..7u32 {
        let when = format!("2026-03-02T10:{minute:02}:00Z");
        let ticket = open(&app, &when, "email", "question", "").await;
        assign(&app, &ticket, &q, "", &when).await;
        let (agent, method, _) = routed_to(&app, &ticket).await;
        assert_eq!(method, "least_loaded");
        picks.push(agent);
    }
    assert_eq!(
        picks,
        [
            "agent:x", "agent:y", "agent:z", "agent:y", "agent:z", "agent:x", "agent:y"
        ]
    );
    // x 2/2 = 10000 bp, y 3/4 = 7500, z 2/3 = 6666 (rounded down).
    let loads: Vec<(String, u32, Option<u32>)> = agent_load(&app, &q, 0, "")
        .await
        .agents
        .into_iter()
        .map(|a| (a.agent, a.open_tickets, a.load_bp))
        .collect();
    assert_eq!(
        loads,
        [
            ("agent:x".to_owned(), 2, Some(10_000)),
            ("agent:y".to_owned(), 3, Some(7_500)),
            ("agent:z".to_owned(), 2, Some(6_666)),
        ]
    );

    // Bad queries name their field.
    for (request, field) in [
        (
            GetAgentLoadRequest {
                queue_id: "support".into(),
                ..Default::default()
            },
            "queue_id",
        ),
        (
            GetAgentLoadRequest {
                page_size: 201,
                ..Default::default()
            },
            "page_size",
        ),
        (
            GetAgentLoadRequest {
                page_token: "not-hex".into(),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        let status = queries(&app)
            .get_agent_load(app.request(request))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    app.stop().await;
}

fn stats(count: u64, median: u64, mean: u64, p90: u64) -> Option<DurationStats> {
    Some(DurationStats {
        count,
        median_minutes: Some(median),
        mean_minutes: Some(mean),
        p90_minutes: Some(p90),
    })
}

fn csat(key: &str, ratings: u64, satisfied: u64, csat_bp: Option<u32>) -> CsatGroup {
    CsatGroup {
        key: key.into(),
        ratings,
        satisfied,
        csat_bp,
    }
}

fn complaints(key: &str, count: u64, solved: u64, mean: Option<u64>) -> ComplaintGroup {
    ComplaintGroup {
        key: key.into(),
        complaints: count,
        solved,
        mean_resolution_minutes: mean,
    }
}

const MARCH: (&str, &str) = ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z");

#[tokio::test]
async fn service_metrics_csat_and_complaint_figures_match_the_hand_computed_ones() {
    let app = TestApp::spawn().await;
    let q = queue(&app, &["agent:a", "agent:b"], &[], "round_robin").await;
    availability(&app, "agent:a", "online", 10, &[], "2026-03-01T00:00:00Z").await;
    availability(&app, "agent:b", "online", 10, &[], "2026-03-01T00:00:00Z").await;

    // k1, Mon 2 March: first response 10 min, solved after 60, rated 5 (a, Q).
    let k1 = open(&app, "2026-03-02T10:00:00Z", "email", "question", "").await;
    assign(&app, &k1, &q, "agent:a", "2026-03-02T10:00:00Z").await;
    say(&app, &k1, "agent", "agent:a", true, "2026-03-02T10:10:00Z").await;
    solve(&app, &k1, "", "2026-03-02T11:00:00Z").await;
    rate(&app, &k1, 5, "2026-03-02T12:00:00Z").await;
    // k2: 20 min, 120 min; rated 2, then 4: the latest wins (a, Q).
    let k2 = open(&app, "2026-03-02T11:00:00Z", "chat", "question", "").await;
    assign(&app, &k2, &q, "agent:a", "2026-03-02T11:00:00Z").await;
    say(&app, &k2, "agent", "agent:a", true, "2026-03-02T11:20:00Z").await;
    solve(&app, &k2, "", "2026-03-02T13:00:00Z").await;
    rate(&app, &k2, 2, "2026-03-02T14:00:00Z").await;
    rate(&app, &k2, 4, "2026-03-02T15:00:00Z").await;
    // k3, a billing complaint: 30 min; solved at 10:00, reopened by the
    // customer at 10:30, solved again at 13:00: resolution 240 min; rated
    // 3 (b, Q).
    let k3 = open(
        &app,
        "2026-03-03T09:00:00Z",
        "email",
        "complaint",
        "billing",
    )
    .await;
    assign(&app, &k3, &q, "agent:b", "2026-03-03T09:00:00Z").await;
    say(&app, &k3, "agent", "agent:b", true, "2026-03-03T09:30:00Z").await;
    solve(&app, &k3, "duplicate_charge", "2026-03-03T10:00:00Z").await;
    say(
        &app,
        &k3,
        "customer",
        "customer",
        true,
        "2026-03-03T10:30:00Z",
    )
    .await;
    solve(&app, &k3, "duplicate_charge", "2026-03-03T13:00:00Z").await;
    rate(&app, &k3, 3, "2026-03-03T14:00:00Z").await;
    // k4, a delivery complaint: 40 min, 480 min; rated 5 under b, then
    // given to a: the rating and the solve stay b's.
    let k4 = open(
        &app,
        "2026-03-03T10:00:00Z",
        "phone",
        "complaint",
        "delivery",
    )
    .await;
    assign(&app, &k4, &q, "agent:b", "2026-03-03T10:00:00Z").await;
    say(&app, &k4, "agent", "agent:b", true, "2026-03-03T10:40:00Z").await;
    solve(&app, &k4, "courier_delay", "2026-03-03T18:00:00Z").await;
    rate(&app, &k4, 5, "2026-03-03T19:00:00Z").await;
    assign(&app, &k4, &q, "agent:a", "2026-03-03T20:00:00Z").await;
    // k5, no queue: a's internal note does not count; the public reply
    // after 100 min does (a's, who wrote first). Not solved.
    let k5 = open(&app, "2026-03-04T08:00:00Z", "web", "question", "").await;
    say(&app, &k5, "agent", "agent:a", false, "2026-03-04T08:05:00Z").await;
    say(&app, &k5, "agent", "agent:a", true, "2026-03-04T09:40:00Z").await;
    // k6, a delivery complaint opened in February (b, no queue): 5 min;
    // solved 2 March after 3 days = 4320 min; rated 1 in March.
    let k6 = open(
        &app,
        "2026-02-27T10:00:00Z",
        "chat",
        "complaint",
        "delivery",
    )
    .await;
    say(&app, &k6, "agent", "agent:b", true, "2026-02-27T10:05:00Z").await;
    solve(&app, &k6, "courier_delay", "2026-03-02T10:00:00Z").await;
    rate(&app, &k6, 1, "2026-03-02T11:00:00Z").await;
    // k7, a delivery complaint nobody has touched.
    open(
        &app,
        "2026-03-05T09:00:00Z",
        "email",
        "complaint",
        "delivery",
    )
    .await;
    let last = app
        .tickets()
        .open_ticket(app.request(OpenTicketRequest {
            options: at("2026-05-01T00:00:00Z"),
            requester_id: crate::support::person(&app, "Ticket", "Requester").await,
            channel: "chat".into(),
            r#type: "question".into(),
            subject: "After the period".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .global_position;
    let options = || Some(QueryOptions { min_position: last });
    let metrics = |basis: &str, queue_id: &str, agent: &str| {
        let request = GetServiceMetricsRequest {
            options: options(),
            from: MARCH.0.into(),
            to: MARCH.1.into(),
            basis: basis.into(),
            queue_id: queue_id.into(),
            agent: agent.into(),
        };
        let app = &app;
        async move {
            queries(app)
                .get_service_metrics(app.request(request))
                .await
                .unwrap()
                .into_inner()
        }
    };

    // Opened in March: k1, k2, k3, k4, k5, k7.
    // First response 10, 20, 30, 40, 100: median 30, mean 200 ÷ 5 = 40,
    // p90 at rank 0.9 × 4 = 3.6: 40 + 0.6 × (100 − 40) = 76.
    // Resolution 60, 120, 240, 480: median (120 + 240) ÷ 2 = 180, mean
    // 900 ÷ 4 = 225, p90 at 0.9 × 3 = 2.7: 240 + 0.7 × (480 − 240) = 408.
    // Reopened k3 of 4 ever solved: 2500 bp.
    let opened = metrics("", "", "").await;
    assert_eq!(
        opened,
        ServiceMetrics {
            tickets: 6,
            first_response: stats(5, 30, 40, 76),
            resolution: stats(4, 180, 225, 408),
            reopened: 1,
            ever_solved: 4,
            reopen_rate_bp: Some(2_500),
            position: opened.position,
        }
    );
    assert!(opened.position >= last);
    // Solved in March: k1, k2, k3, k4 and k6 (solved 2 March).
    // First response 5, 10, 20, 30, 40: median 20, mean 105 ÷ 5 = 21, p90 at
    // 3.6: 30 + 0.6 × 10 = 36. Resolution 60, 120, 240, 480, 4320: median
    // 240, mean 5220 ÷ 5 = 1044, p90 480 + 0.6 × 3840 = 2784. Reopened 1 of
    // 5: 2000 bp.
    let solved = metrics("solved", "", "").await;
    assert_eq!(
        (
            solved.tickets,
            solved.first_response,
            solved.resolution,
            solved.reopen_rate_bp
        ),
        (
            5,
            stats(5, 20, 21, 36),
            stats(5, 240, 1044, 2784),
            Some(2_000)
        )
    );
    // Credited to a (opened in March): k1, k2 (solved by a) and k5 (a's,
    // open); not k4, solved by b and reassigned later. First response 10,
    // 20, 100: median 20, mean 130 ÷ 3 = 43.3 → 43, p90 at 1.8: 20 + 0.8 ×
    // 80 = 84. Resolution 60, 120: median 90, mean 90, p90 at 0.9: 60 + 0.9
    // × 60 = 114. None reopened: 0 bp.
    let by_a = metrics("", "", "agent:a").await;
    assert_eq!(
        (
            by_a.tickets,
            by_a.first_response,
            by_a.resolution,
            by_a.reopen_rate_bp
        ),
        (3, stats(3, 20, 43, 84), stats(2, 90, 90, 114), Some(0))
    );
    // Queue Q: k1 to k4. First response 10, 20, 30, 40: median 25, mean
    // 25, p90 at 2.7: 30 + 0.7 × 10 = 37.
    let by_queue = metrics("", &q, "").await;
    assert_eq!(
        (
            by_queue.tickets,
            by_queue.first_response,
            by_queue.resolution
        ),
        (4, stats(4, 25, 25, 37), stats(4, 180, 225, 408))
    );

    // CSAT in March, each ticket's latest rating with its snapshot:
    // a: k1 5, k2 4 → 2 of 2 = 10000 bp; b: k3 3, k4 5, k6 1 → 1 of 3 =
    // 3333 bp; overall 3 of 5 = 6000 bp. Queue Q: k1..k4 → 3 of 4 = 7500
    // bp; no queue: k6 → 0 of 1.
    let report = queries(&app)
        .get_csat(app.request(GetCsatRequest {
            options: options(),
            from: MARCH.0.into(),
            to: MARCH.1.into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.overall, Some(csat("", 5, 3, Some(6_000))));
    assert_eq!(
        report.per_agent,
        [
            csat("agent:a", 2, 2, Some(10_000)),
            csat("agent:b", 3, 1, Some(3_333))
        ]
    );
    assert_eq!(
        report.per_queue,
        [csat("", 1, 0, Some(0)), csat(&q, 4, 3, Some(7_500))]
    );

    // Complaints opened in March: k3 (billing, duplicate_charge, 240 min),
    // k4 (delivery, courier_delay, 480 min), k7 (delivery, open).
    let complaint_stats = |from: &str| {
        let request = GetComplaintStatsRequest {
            options: options(),
            from: from.into(),
            to: MARCH.1.into(),
        };
        let app = &app;
        async move {
            queries(app)
                .get_complaint_stats(app.request(request))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let march = complaint_stats(MARCH.0).await;
    assert_eq!(march.complaints, 3);
    assert_eq!(
        march.per_category,
        [
            complaints("billing", 1, 1, Some(240)),
            complaints("delivery", 2, 1, Some(480))
        ]
    );
    assert_eq!(
        march.per_root_cause,
        [
            complaints("", 1, 0, None),
            complaints("courier_delay", 1, 1, Some(480)),
            complaints("duplicate_charge", 1, 1, Some(240)),
        ]
    );
    // From February, k6 too (delivery, courier_delay, 4320 min): delivery
    // 3 complaints, 2 solved, mean (480 + 4320) ÷ 2 = 2400.
    let since_february = complaint_stats("2026-02-01T00:00:00Z").await;
    assert_eq!(since_february.complaints, 4);
    assert_eq!(
        since_february.per_category[1],
        complaints("delivery", 3, 2, Some(2_400))
    );
    assert_eq!(
        since_february.per_root_cause[1],
        complaints("courier_delay", 2, 2, Some(2_400))
    );

    // Another tenant sees none of it.
    let other = |message| as_caller(message, Some("someone-else"), Some("user:eve"));
    let nothing = queries(&app)
        .get_service_metrics(other(GetServiceMetricsRequest {
            from: MARCH.0.into(),
            to: MARCH.1.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            nothing.tickets,
            nothing.first_response,
            nothing.reopen_rate_bp
        ),
        (
            0,
            Some(DurationStats {
                count: 0,
                ..Default::default()
            }),
            None
        )
    );
    let nothing = queries(&app)
        .get_csat(as_caller(
            GetCsatRequest {
                from: MARCH.0.into(),
                to: MARCH.1.into(),
                ..Default::default()
            },
            Some("someone-else"),
            Some("user:eve"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nothing.overall, Some(csat("", 0, 0, None)));
    assert!(nothing.per_agent.is_empty() && nothing.per_queue.is_empty());
    let nothing = queries(&app)
        .get_complaint_stats(as_caller(
            GetComplaintStatsRequest {
                from: MARCH.0.into(),
                to: MARCH.1.into(),
                ..Default::default()
            },
            Some("someone-else"),
            Some("user:eve"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nothing.complaints, 0);
    app.stop().await;
}

#[tokio::test]
async fn bad_metrics_csat_and_complaint_queries_name_their_field() {
    let app = TestApp::spawn().await;
    let march = || GetServiceMetricsRequest {
        from: MARCH.0.into(),
        to: MARCH.1.into(),
        ..Default::default()
    };
    for (request, field) in [
        (
            GetServiceMetricsRequest {
                from: "yesterday".into(),
                ..march()
            },
            "from",
        ),
        (
            GetServiceMetricsRequest {
                to: MARCH.0.into(),
                ..march()
            },
            "to",
        ),
        (
            GetServiceMetricsRequest {
                to: "2040-01-01T00:00:00Z".into(),
                ..march()
            },
            "to",
        ),
        (
            GetServiceMetricsRequest {
                basis: "closed".into(),
                ..march()
            },
            "basis",
        ),
        (
            GetServiceMetricsRequest {
                queue_id: "support".into(),
                ..march()
            },
            "queue_id",
        ),
        (
            GetServiceMetricsRequest {
                agent: "a".repeat(201),
                ..march()
            },
            "agent",
        ),
    ] {
        let status = queries(&app)
            .get_service_metrics(app.request(request))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    for (from, to, field) in [
        ("", MARCH.1, "from"),
        (MARCH.0, "next month", "to"),
        (MARCH.1, MARCH.0, "to"),
    ] {
        let status = queries(&app)
            .get_csat(app.request(GetCsatRequest {
                options: None,
                from: from.into(),
                to: to.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
        let status = queries(&app)
            .get_complaint_stats(app.request(GetComplaintStatsRequest {
                options: None,
                from: from.into(),
                to: to.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    app.stop().await;
}

/// Queue overflow (DOMAIN.md §5.2, "none eligible: wait, then overflow"):
/// Tier 1's only member is offline, so a ticket queued there at 09:00
/// waits; its queue overflows to Tier 2 after 15 minutes. At 09:14 the
/// scheduler does nothing; at 09:15 it moves the ticket, unassigned, to Tier
/// 2 (method `overflow`), where the router gives it to Tier 2's online
/// agent. A ticket of Tier 1 assigned by hand meanwhile stays put, and a
/// second tick changes nothing.
#[tokio::test]
async fn a_ticket_nobody_is_eligible_for_overflows_to_the_next_queue_after_its_wait() {
    use std::sync::{Arc, Mutex};
    let app = TestApp::spawn_with(|config| config.scheduler_interval_ms = 0).await;
    let clock = Arc::new(crate::support::TestClock(Mutex::new(
        "2026-03-02T08:00:00Z".parse().unwrap(),
    )));
    let (scheduler, store) = crate::support::test_scheduler(&app, clock.clone()).await;
    let publish = |request: PublishQueueRequest| {
        let app = &app;
        async move {
            app.configuration()
                .publish_queue(as_manager(app, request))
                .await
        }
    };
    let tier2 = publish(PublishQueueRequest {
        options: at("2026-03-01T00:00:00Z"),
        name: "Tier 2".into(),
        members: vec!["agent:z".into()],
        routing: "round_robin".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .stream_id;
    let tier1_request = PublishQueueRequest {
        options: at("2026-03-01T00:00:00Z"),
        name: "Tier 1".into(),
        members: vec!["agent:y".into()],
        routing: "round_robin".into(),
        overflow_queue_id: tier2.clone(),
        overflow_after_minutes: Some(15),
        ..Default::default()
    };
    // Bad overflow settings are refused, naming the field.
    for (bad, field) in [
        (
            PublishQueueRequest {
                overflow_after_minutes: Some(0),
                ..tier1_request.clone()
            },
            "overflow_after_minutes",
        ),
        (
            PublishQueueRequest {
                overflow_queue_id: String::new(),
                ..tier1_request.clone()
            },
            "overflow_after_minutes",
        ),
        (
            PublishQueueRequest {
                queue_id: tier2.clone(),
                ..tier1_request.clone()
            },
            "overflow_queue_id",
        ),
        (
            PublishQueueRequest {
                overflow_queue_id: "tier-2".into(),
                ..tier1_request.clone()
            },
            "overflow_queue_id",
        ),
    ] {
        let status = publish(bad).await.unwrap_err();
        assert_eq!(bad_fields(&status), [field], "{status:?}");
    }
    // An overflow queue that was never published.
    let status = publish(PublishQueueRequest {
        overflow_queue_id: uuid::Uuid::now_v7().to_string(),
        ..tier1_request.clone()
    })
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("overflow_queue_id"), "{status:?}");
    let tier1 = publish(tier1_request).await.unwrap().into_inner().stream_id;
    let morning = "2026-03-02T08:00:00Z";
    availability(&app, "agent:y", "offline", 5, &[], morning).await;
    availability(&app, "agent:z", "online", 5, &[], morning).await;

    let waiting = open(&app, "2026-03-02T09:00:00Z", "email", "question", "").await;
    assign(&app, &waiting, &tier1, "", "2026-03-02T09:00:00Z").await;
    let handled = open(&app, "2026-03-02T09:00:00Z", "email", "question", "").await;
    assign(&app, &handled, &tier1, "", "2026-03-02T09:00:00Z").await;
    app.tickets()
        .assign_ticket(app.request(AssignTicketRequest {
            options: at("2026-03-02T09:05:00Z"),
            ticket_id: handled.clone(),
            queue_id: tier1.clone(),
            assignee: "agent:y".into(),
            override_reason: "the customer asked for Y".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    router_reached(&app, head(&app).await).await;

    clock.set("2026-03-02T09:14:00Z");
    assert_eq!(scheduler.tick().await.appended, 0);
    clock.set("2026-03-02T09:15:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    assert_eq!(
        routed_to(&app, &waiting).await,
        (
            "agent:z".into(),
            "round_robin".into(),
            ts("2026-03-02T09:15:00Z")
        )
    );
    let moves = assignments(&app, &waiting).await;
    assert_eq!(
        moves[1],
        (
            tier2.clone(),
            None,
            "overflow".into(),
            ts("2026-03-02T09:15:00Z")
        )
    );
    assert_eq!(moves.len(), 3, "{moves:?}");
    router_reached(&app, head(&app).await).await;
    clock.set("2026-03-02T12:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 0, "once");
    // The ticket given to Y by hand never moved.
    let handled_moves: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE stream_id = $1 \
             AND payload->>'method' = 'overflow'",
            &[&uuid::Uuid::parse_str(&handled).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(handled_moves, 0);
    store.shutdown().await;
}
